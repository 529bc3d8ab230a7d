"""gridtrain.model"""
