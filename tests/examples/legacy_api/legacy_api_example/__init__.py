"""legacy-api-example: federated linear regression with NumPy on the legacy API."""
