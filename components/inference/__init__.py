"""Classifying images with a registered visiontune model, the same way wherever it runs:
`visiontune predict` (`pipelines/predict.py`), promote's scoring of both versions and the
Python API all go through the model's own `predict`, as `mlflow models serve` does.

- `formats`: which models can be classified: this format as it is, an older visiontune
  model (a tensor model) adapted, anything else refused in one line;
- `local`: in this process (bytes, paths, object-storage URIs or PIL images);
- `ray_data`: a Ray Data job over the cluster, every actor with the same model version;
- `output`: predict's rows written as they come (CSV or Parquet, the partial file).

Importing the package imports none of them: `ray_data` imports Ray only when it runs.
"""
