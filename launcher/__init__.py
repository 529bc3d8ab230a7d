"""gridtrain.launcher"""
