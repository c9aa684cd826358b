"""Private inference: a trained model answers predictions on secret-shared inputs.

Two computing parties hold additive shares of the model and of the queries in
the ring Z_2^64; a dealer (PySyft's "crypto provider") hands them correlated
randomness; the model owner and the data owner only share and, for the data
owner, reconstruct. ``ring`` holds the fixed-point encoding and the PRG,
``correlations`` what the dealer makes, ``engine`` the two-party protocols,
``program`` the models as layer lists, ``channel`` the framed TLS links and
``parties`` each role's main loop.
"""
