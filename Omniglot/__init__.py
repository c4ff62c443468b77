"""Omniglot experiment: each of the 50 alphabets is one classification task.

`Omniglot.dataTools` writes the seeded train/test lists and the HDF5 image cache and
samples batches, `Omniglot.synthetic` builds a synthetic stand-in data set in the same
folder layout, `Omniglot.train` trains one network, `Omniglot.stack` and `Omniglot.sweep`
train many TAAN runs at once, `Omniglot.Evaluation_TAAN` runs the lambda sweep of one
regulariser, `Omniglot.reproduce` the paper's whole figure, `Omniglot.results` reads and
writes the result files and `Omniglot.Figure_wrt_Lambda` plots test accuracy against the
regularisation weight.
"""
