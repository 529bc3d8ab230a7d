"""gridtrain.parallel"""
