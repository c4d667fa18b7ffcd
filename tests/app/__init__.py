"""The application: the geolora command, task loaders, metrics, models, the training harness, benchmarks."""
