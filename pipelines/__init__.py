"""visiontune pipelines: composition of components, the CLI and job submission."""
