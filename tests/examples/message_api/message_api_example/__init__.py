"""message-api-example: federated linear regression with NumPy on the Message API."""
