"""Training data: the task x data-fold cross-validation and the datasets that make synthetic anomalies on the fly."""
