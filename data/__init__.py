"""gridtrain.data"""
