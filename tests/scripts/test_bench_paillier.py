"""The CKKS comparison and the bandwidth model of scripts/bench_paillier.py run the real
TenSEAL on a small vector: the benchmark cannot drift from what it claims to measure."""

from __future__ import annotations

import numpy as np
import pytest

from tests.helpers import load_script


def test_ckks_benchmark_encrypts_adds_and_decrypts_within_its_precision():
    bench = load_script("bench_paillier")
    rng = np.random.default_rng(0)
    values = rng.normal(0.0, 0.05, 10_000)
    out = bench.ckks_benchmark(values, 3, 5_000, rng)
    assert out["values"] == 10_000 and out["ciphertexts"] == 3  # 4096 slots each
    assert out["max_abs_error"] < 1e-6 and out["max_abs_error_sum"] < 1e-6
    assert out["encrypt_values_per_s"] > 0 and out["add_values_per_s"] > 0
    # three ciphertexts of poly 8192 with [60, 40, 40] are about 230 KB each
    assert 10 < out["wire_ratio_vs_float32"] < 25


def test_bandwidth_model_adds_crypto_time_to_the_bytes_over_each_link():
    bench = load_script("bench_paillier")
    model = bench.bandwidth_model(100, {
        "plain": {"encrypt_s": 0.0, "decrypt_s": 0.0, "bytes_up": 1_250_000,
                  "bytes_down": 1_250_000},
        "heavy": {"encrypt_s": 2.0, "decrypt_s": 3.0, "bytes_up": 125_000,
                  "bytes_down": 125_000}})
    plain, heavy = (model["client_round_seconds"][k] for k in ("plain", "heavy"))
    # 2.5 MB = 20 Mbit: 20 s at 1 Mbit/s, 2 s at 10, 0.2 s at 100
    assert (plain["1_mbit_s"], plain["10_mbit_s"], plain["100_mbit_s"]) == (20.0, 2.0, 0.2)
    assert heavy["crypto_cpu_s"] == 5.0
    assert heavy["1_mbit_s"] == pytest.approx(7.0) and heavy["100_mbit_s"] == pytest.approx(5.02)


def test_threshold_benchmark_decrypts_for_real_and_scales_to_the_mnist_aggregate(keypair):
    bench = load_script("bench_paillier")
    from strategies.paillier import Encryptor

    public, private = keypair
    aggregate = Encryptor(public, private).encrypt_to_array(list(range(4)))
    from strategies.aggregation import Layout
    from strategies.encoding import EncodingParams

    layout = Layout(("w", "b"), ((100, 30), (30,)), ("float32", "float32"))
    params = EncodingParams.for_key(public.n_bits, 128, clip=0.5)
    out = bench.threshold_benchmark(public, private, aggregate, 400, 2, 3, params, layout,
                                    sample=4)
    assert (out["threshold"], out["shares"], out["sample_ciphertexts"]) == (2, 3, 4)
    cpu = out["mnist_cnn_client_decryption_cpu_per_round_s"]
    single = out["single_holder_decrypt_s_per_ciphertext"] * 400
    # today every one of the 3 clients decrypts the 400 ciphertexts; decrypt-once one
    assert cpu["single_holder_every_client_decrypts"] == pytest.approx(3 * single, abs=0.1)
    assert cpu["single_holder_decrypt_once"] == pytest.approx(single, abs=0.1)
    assert out["partial_vs_single_holder_decrypt"] > 1  # no CRT, 4,000-bit exponents
    # the contribution proof was made and checked on all 400 ciphertexts (it raises if not)
    proof = out["mnist_cnn_contribution_proof"]
    assert proof["ciphertexts"] == 400 and proof["prove_s"] > 0 and proof["verify_s"] > 0
    # the sealed model: float32 values, a nonce, a GCM tag and the metric means
    sealed = out["sealed_model"]
    assert sealed["float32_bytes"] == 4 * 3030
    assert 0 < sealed["bytes"] - sealed["float32_bytes"] < 100
    # the masked payload ran for real on the whole layout (it checks its own average):
    # 33 secret rows and the tag, whatever the model's size, decrypted by 2 shares
    masked = out["masked_payload"]
    assert masked["ciphertexts_per_contribution"] == 34
    assert masked["max_abs_error"] <= params.max_error()
    assert masked["client_decryption_cpu_per_round_with_checks_s"] >= \
        masked["client_decryption_cpu_per_round_s"] > 0
    # one 4,096-coefficient ring element of 8 bytes each for the 3,030 values, and more
    assert masked["wire_bytes_per_contribution"] > 8 * 4096
