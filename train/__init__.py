"""gridtrain.train"""
