"""Youtube-8M experiment: data conversion, built-in synthetic data, loaders, models, training."""
