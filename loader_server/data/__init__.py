"""The data set: what the samples are (list files, class folders, arrays, subsets) and what a batch
looks like (BatchSpec). `load_dataset(settings)` is the one entry point."""
