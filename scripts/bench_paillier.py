"""Benchmark: packed Paillier (strategies.encoding + strategies.paillier) against
per-value Paillier with ``phe``, side by side in one run, on one core, 2048-bit keys.

    python scripts/bench_paillier.py [--params 1663370] [--clients 10] [--agg-params 50000]

Measures
  * ``phe``: ``public_key.encrypt(x)`` on a few hundred floats (params/s), and decryption;
  * ours: quantize + pack + encrypt of ``--params`` values (params/s, with the one-off
    encryptor set-up included and excluded), and the speedup over ``phe``;
  * server aggregation of ``--clients`` clients' ciphertext arrays of ``--agg-params``
    values each (validation + homomorphic sum), scaled to the MNIST CNN;
  * client decryption + decoding of that aggregate (params/s);
  * bytes on the wire for the McMahan MNIST CNN (1,663,370 parameters) vs float32;
  * the largest error of the decrypted weighted average against plaintext weighted
    FedAvg on the same float32 updates, and the bound ``EncodingParams.max_error()``.

  * **CKKS side by side** (TenSEAL, NVFlare's default context: polynomial modulus 8192,
    coefficient moduli [60, 40, 40], scale 2^40): encrypt, add and decrypt values/s, wire
    bytes vs float32 and the largest error, on the same ``--params`` values
    (:func:`ckks_benchmark`; TenSEAL is in the test extras only);
  * **threshold decryption** (:func:`threshold_benchmark`, ``--threshold`` of
    ``--clients``): the packed payload's partial decryptions scaled to the CNN, and the
    masked payload (:func:`masked_payload`) run for real on the whole CNN; the clients'
    decryption CPU per round of each mode beside every client decrypting;
  * **a bandwidth model** (:func:`bandwidth_model`): for 1, 10 and 100 Mbit/s client links,
    a client's round time in each scheme modelled as its crypto CPU (encrypting its update,
    decrypting the model) plus the bytes it sends and receives over the link.

Everything above runs in this process (``workers=1``). Then, unless ``--sim-rounds 0``:
  * real Flower simulations of MNIST (full data, McMahan CNN, ``--sim-clients`` clients,
    all training each round, E=1, B=32, no centralized evaluation), plaintext weighted
    FedAvg, Paillier and threshold Paillier (masked payload) with the same settings, back
    to back: seconds per round (rounds after the first), bytes per round and the final
    federated accuracy of each (the nodes release their evaluation metrics).

Shared machines make absolute times noisy: compare the ratios measured in the same run.
The last line is a JSON summary.
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import statistics
import sys
import time
from pathlib import Path

for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_var, "1")

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
from phe import paillier as phe_paillier  # noqa: E402

from strategies.aggregation import weighted_average  # noqa: E402
from strategies.encoding import EncodingParams, decode, encode  # noqa: E402
from strategies.paillier import (  # noqa: E402
    Encryptor,
    aggregate_arrays,
    generate_keypair,
)
from strategies.paillier_protocol import EncryptedModel  # noqa: E402
from strategies.paillier_tags import TagKey  # noqa: E402
from strategies.aggregation import Layout  # noqa: E402

MNIST_CNN_PARAMS = 1_663_370  # McMahan et al. 2017 CNN: conv5x5x32, conv5x5x64, fc512, fc10
KEY_BITS = 2048


def log(message: str) -> None:
    print(message, flush=True)


def timed(fn, *args, **kwargs):
    start = time.perf_counter()
    out = fn(*args, **kwargs)
    return out, time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--params", type=int, default=MNIST_CNN_PARAMS,
                        help="values one client encodes and encrypts (ours)")
    parser.add_argument("--phe-values", type=int, default=200,
                        help="floats encrypted one by one with phe")
    parser.add_argument("--clients", type=int, default=10)
    parser.add_argument("--threshold", type=int, default=3,
                        help="decryptors needed in the threshold measurement (of --clients)")
    parser.add_argument("--agg-params", type=int, default=50_000,
                        help="values per client for the aggregation and decryption runs")
    parser.add_argument("--max-total-weight", type=int, default=128,
                        help="headroom of the encoding: the clients' integer weights "
                             "sum to at most this")
    parser.add_argument("--clip", type=float, default=0.5)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--sim-rounds", type=int, default=3,
                        help="rounds of each MNIST simulation (0: skip the simulations)")
    parser.add_argument("--sim-clients", type=int, default=10)
    parser.add_argument("--data-dir", default=str(ROOT.parent / "shared" / "data"))
    args = parser.parse_args()
    rng = np.random.default_rng(args.seed)
    summary: dict[str, object] = {"benchmark": "paillier", "key_bits": KEY_BITS, "cores": 1,
                                  "cpu_count": os.cpu_count(),
                                  "load_average_1min": os.getloadavg()[0]}

    # -- keys -------------------------------------------------------------------------------
    (pk, sk), t_ours_keygen = timed(generate_keypair, KEY_BITS)
    (phe_pk, phe_sk), t_phe_keygen = timed(phe_paillier.generate_paillier_keypair,
                                           n_length=KEY_BITS)
    log(f"keygen: ours {t_ours_keygen:.2f} s, phe {t_phe_keygen:.2f} s")
    params = EncodingParams.for_key(pk.n_bits, args.max_total_weight, clip=args.clip)
    log(f"encoding: {params} -> max error {params.max_error():.3g}")

    # -- per-value phe ------------------------------------------------------------------------
    floats = rng.normal(0.0, 0.05, args.phe_values).astype(np.float32).astype(float)
    phe_cts, t_phe = timed(lambda: [phe_pk.encrypt(x) for x in floats])
    phe_rate = len(floats) / t_phe
    some = phe_cts[:50]
    _, t_phe_dec = timed(lambda: [phe_sk.decrypt(c) for c in some])
    phe_dec_rate = len(some) / t_phe_dec
    log(f"phe per-value: encrypt {phe_rate:.1f} params/s ({len(floats)} floats in {t_phe:.2f} s), "
        f"decrypt {phe_dec_rate:.1f} params/s; MNIST CNN would take "
        f"{MNIST_CNN_PARAMS / phe_rate / 3600:.2f} h to encrypt")

    # -- ours: one client's encode + encrypt --------------------------------------------------
    update = rng.normal(0.0, 0.05, args.params).astype(np.float32)
    encryptor, t_setup = timed(Encryptor, pk, sk)
    tag_key = TagKey.from_private_key(sk)
    context = bytes(32)  # a round's context (paillier_protocol.EncryptedModel.context)
    plaintexts, t_encode = timed(encode, update, params, 7, rng)
    tag, t_tag = timed(tag_key.tag, plaintexts, context, 1, 7)
    array, t_encrypt = timed(encryptor.encrypt_to_array, [*plaintexts, tag])
    ours_rate = args.params / (t_setup + t_encode + t_tag + t_encrypt)
    ours_rate_warm = args.params / (t_encode + t_tag + t_encrypt)
    log(f"ours: {args.params} params -> {array.shape[0]} ciphertexts (the last the tag); "
        f"set-up {t_setup:.2f} s, quantize+pack {t_encode:.3f} s, tag {t_tag:.3f} s, encrypt "
        f"{t_encrypt:.2f} s -> {ours_rate:,.0f} params/s ({ours_rate_warm:,.0f} without set-up); "
        f"speedup over phe {ours_rate / phe_rate:,.0f}x")

    # -- server aggregation for K clients --------------------------------------------------------
    weights = [int(w) for w in rng.integers(1, args.max_total_weight // args.clients + 1,
                                            args.clients)]
    total_weight = sum(weights)
    updates = [rng.normal(0.0, 0.05, args.agg_params).astype(np.float32)
               for _ in range(args.clients)]
    updates[0][:10] = [args.clip, -args.clip, 0, 1e-6, -1e-6, 0.3, -0.3, 0.49, -0.49, 0.01]
    count = params.num_plaintexts(args.agg_params) + 1  # and the tag
    arrays = []
    for k, (x, w) in enumerate(zip(updates, weights)):
        packed = encode(x, params, w, rng)
        arrays.append(encryptor.encrypt_to_array([*packed, tag_key.tag(packed, context, k, w)]))
        log(f"client {k}: weight {w}, {count} ciphertexts")
    agg_times = []
    for _ in range(3):
        aggregate, t_agg = timed(aggregate_arrays, pk, arrays, count=count)
        agg_times.append(t_agg)
    t_agg = statistics.median(agg_times)
    full_count = params.num_plaintexts(MNIST_CNN_PARAMS)
    t_agg_full = t_agg * full_count / count
    log(f"server: aggregate {args.clients} x {count} ciphertexts in {t_agg:.3f} s (median of 3) "
        f"-> {t_agg_full:.1f} s for the MNIST CNN ({full_count} ciphertexts per client)")

    # -- client decryption + decoding ------------------------------------------------------------
    start = time.perf_counter()
    *sums, total_tag = sk.decrypt_array(aggregate, count=count)
    authentic, t_verify = timed(tag_key.verify, sums, total_tag, context, dict(enumerate(weights)))
    assert authentic, "the tag of an honest aggregate does not check"
    average = decode(sums, params, args.agg_params, total_weight)
    t_dec = time.perf_counter() - start
    dec_rate = args.agg_params / t_dec
    log(f"client: decrypt+verify+decode {args.agg_params} params in {t_dec:.2f} s (tag check "
        f"{t_verify:.3f} s) -> {dec_rate:,.0f} params/s; MNIST CNN {MNIST_CNN_PARAMS / dec_rate:.0f} s")

    expected = weighted_average([[x] for x in updates], weights)[0].astype(np.float64)
    max_err = float(np.abs(average - expected).max())
    mean_err = float((average - expected).mean())
    log(f"error vs plaintext weighted FedAvg: max {max_err:.3g} (bound {params.max_error():.3g}), "
        f"mean signed {mean_err:.2g}")

    # -- wire size ---------------------------------------------------------------------------
    bytes_per_ct = array.shape[1]
    assert array.nbytes == array.shape[0] * bytes_per_ct
    # the header each upload carries beside its ciphertexts (the MNIST CNN's 8 arrays)
    cnn = Layout(("conv1.w", "conv1.b", "conv2.w", "conv2.b", "fc1.w", "fc1.b", "fc2.w", "fc2.b"),
                 ((32, 1, 5, 5), (32,), (64, 32, 5, 5), (64,), (512, 3136), (512,), (10, 512),
                  (10,)), ("float32",) * 8)
    header = EncryptedModel(array, pk.fingerprint, params, cnn, run=1, server_round=1,
                            contributors={1: 1}).header()
    meta_bytes = len(json.dumps(header, sort_keys=True))
    wire_bytes = (full_count + 1) * bytes_per_ct  # and the tag
    float32_bytes = 4 * MNIST_CNN_PARAMS
    examples_params = EncodingParams.for_key(pk.n_bits, 65_536, clip=args.clip)
    examples_ratio = (examples_params.num_plaintexts(MNIST_CNN_PARAMS) + 1) * bytes_per_ct / float32_bytes
    log(f"wire: {full_count + 1} x {bytes_per_ct} B = {wire_bytes / 1e6:.2f} MB (+{meta_bytes} B of "
        f"metadata) vs float32 {float32_bytes / 1e6:.2f} MB -> {wire_bytes / float32_bytes:.3f}x; "
        f"with weights up to 65,536 (example counts): {examples_ratio:.3f}x; phe per value: "
        f"{2 * phe_pk.n.bit_length() // 8 / 4:.0f}x")

    summary.update({
        "encoding": params.to_dict(),
        "clients": args.clients,
        "weights": weights,
        "keygen_s": {"ours": round(t_ours_keygen, 3), "phe": round(t_phe_keygen, 3)},
        "phe_encrypt_params_per_s": round(phe_rate, 2),
        "phe_decrypt_params_per_s": round(phe_dec_rate, 2),
        "phe_mnist_cnn_encrypt_hours": round(MNIST_CNN_PARAMS / phe_rate / 3600, 2),
        "ours_params_measured": args.params,
        "ours_encryptor_setup_s": round(t_setup, 3),
        "ours_encode_s": round(t_encode, 3),
        "ours_tag_s": round(t_tag, 4),
        "ours_encrypt_s": round(t_encrypt, 3),
        "ours_encode_encrypt_params_per_s": round(ours_rate),
        "ours_encode_encrypt_params_per_s_without_setup": round(ours_rate_warm),
        "speedup_vs_phe": round(ours_rate / phe_rate, 1),
        "server_aggregate_s_measured": round(t_agg, 4),
        "server_aggregate_ciphertexts_measured": count,
        "server_aggregate_s_mnist_cnn": round(t_agg_full, 2),
        "client_decrypt_decode_params_per_s": round(dec_rate),
        "client_tag_check_s_measured": round(t_verify, 4),
        "client_decrypt_decode_s_mnist_cnn": round(MNIST_CNN_PARAMS / dec_rate, 1),
        "mnist_cnn_params": MNIST_CNN_PARAMS,
        "mnist_cnn_ciphertexts": full_count + 1,
        "wire_bytes_mnist_cnn": wire_bytes,
        "metadata_bytes": meta_bytes,
        "float32_bytes_mnist_cnn": float32_bytes,
        "wire_ratio_vs_float32": round(wire_bytes / float32_bytes, 3),
        "wire_ratio_vs_float32_weights_up_to_65536": round(examples_ratio, 3),
        "max_abs_error": max_err,
        "max_error_bound": params.max_error(),
        "mean_signed_error": mean_err,
        "targets_met": {
            "encode_encrypt_ge_40000_params_per_s": ours_rate >= 40_000,
            "speedup_ge_300x": ours_rate / phe_rate >= 300,
            "wire_le_1.5x_float32": wire_bytes / float32_bytes <= 1.5,
            "error_within_bound": max_err <= params.max_error(),
        },
    })
    summary["threshold"] = threshold_benchmark(pk, sk, aggregate, full_count + 1,
                                               args.threshold, args.clients, params, cnn)
    sealed = summary["threshold"]["sealed_model"]
    masked = summary["threshold"]["masked_payload"]
    # -- CKKS side by side, and the bandwidth model --------------------------------------------
    ckks = ckks_benchmark(update.astype(np.float64), args.clients, args.agg_params, rng)
    log(f"CKKS (TenSEAL, poly 8192): encrypt {ckks['encrypt_values_per_s']:,} values/s, decrypt "
        f"{ckks['decrypt_values_per_s']:,} values/s, add {ckks['add_values_per_s']:,} values/s, "
        f"wire {ckks['wire_ratio_vs_float32']}x float32, max error {ckks['max_abs_error']:.2g}; "
        f"ours encrypt {ours_rate_warm:,.0f}, decrypt {dec_rate:,.0f} values/s, wire "
        f"{wire_bytes / float32_bytes:.2f}x")
    ckks_wire_mnist = ckks["wire_bytes"] * MNIST_CNN_PARAMS / args.params
    model = bandwidth_model(MNIST_CNN_PARAMS, {
        "plaintext": {"encrypt_s": 0.0, "decrypt_s": 0.0, "bytes_up": float32_bytes,
                      "bytes_down": float32_bytes},
        "paillier": {"encrypt_s": MNIST_CNN_PARAMS / ours_rate_warm,
                     "decrypt_s": MNIST_CNN_PARAMS / dec_rate, "bytes_up": wire_bytes,
                     "bytes_down": wire_bytes},
        "paillier_decrypt_once": {"encrypt_s": MNIST_CNN_PARAMS / ours_rate_warm,
                                  "decrypt_s": sealed["open_s"], "bytes_up": wire_bytes,
                                  "bytes_down": sealed["bytes"]},
        "threshold_paillier": {
            "encrypt_s": summary["threshold"]["encrypt_s_per_ciphertext"] * (full_count + 1)
            + summary["threshold"]["mnist_cnn_contribution_proof"]["prove_s"],
            "decrypt_s": sealed["open_s"], "bytes_up": wire_bytes,
            "bytes_down": sealed["bytes"]},
        "threshold_masked": {
            "encrypt_s": masked["client_encrypt_and_prove_s"], "decrypt_s": sealed["open_s"],
            "bytes_up": masked["wire_bytes_per_contribution"], "bytes_down": sealed["bytes"]},
        "ckks": {"encrypt_s": MNIST_CNN_PARAMS / ckks["encrypt_values_per_s"],
                 "decrypt_s": MNIST_CNN_PARAMS / ckks["decrypt_values_per_s"],
                 "bytes_up": round(ckks_wire_mnist), "bytes_down": round(ckks_wire_mnist)},
    })
    for name, row in model["client_round_seconds"].items():
        log(f"bandwidth model, {name}: crypto {row['crypto_cpu_s']} s; at 1/10/100 Mbit/s "
            f"{row['1_mbit_s']} / {row['10_mbit_s']} / {row['100_mbit_s']} s per round")
    summary.update({"ckks": ckks, "bandwidth_model": model})
    summary["targets_met"]["threshold_masked_decryption_cpu_le_one_third_of_today"] = (
        masked["goal_threshold_cpu_le_one_third_of_today"])
    if args.sim_rounds > 0:
        sim = summary["simulation"] = simulate_mnist(args)
        for name in ("paillier", "paillier_threshold"):
            ratio = sim[f"ratio_seconds_per_round_{name}"]
            summary["targets_met"][f"{name}_le_2x_plaintext_seconds_per_round"] = (
                ratio is not None and ratio <= 2.0)
    print(json.dumps(summary))


def threshold_benchmark(pk, sk, aggregate: np.ndarray, mnist_ciphertexts: int,
                        threshold: int, clients: int, params: EncodingParams, cnn: Layout,
                        sample: int = 24) -> dict:
    """Threshold decryption (strategies.threshold_paillier, a ``threshold``-of-``clients``
    2048-bit key) beside single-holder decryption, per ciphertext on ``sample``
    ciphertexts, scaled to the MNIST CNN's aggregate: each decryptor's partial
    decryption with its proof, the verification of the partials and their combination;
    sealing the decrypted CNN under the group key and opening it (measured on the
    whole model); and the clients' decryption CPU per round in each mode (single holder:
    every client decrypts; decrypt-once: one decrypts and seals, the others open;
    threshold: ``threshold`` decryptors and one combiner, then every client opens)."""
    from strategies.threshold_paillier import (ThresholdEncryptor, combine,
                                               deal_threshold_key, partial_decrypt,
                                               verify_partial)
    from strategies.threshold_protocol import GroupKey, open_model, seal_model

    (public, shares), t_deal = timed(deal_threshold_key, threshold, clients, KEY_BITS)
    encryptor = ThresholdEncryptor(public)
    plaintexts = [secrets.randbelow(int(public.n)) for _ in range(sample)]
    cts, t_enc = timed(lambda: [encryptor.encrypt(m) for m in plaintexts])
    context = b"bench"
    partials, t_partial = timed(lambda: [partial_decrypt(s, cts, context)
                                         for s in shares[:threshold]])
    t_partial /= threshold
    (result, left_out), t_combine = timed(combine, public, cts, partials, context)
    assert result == plaintexts and not left_out, "threshold decryption is wrong"
    _, t_verify = timed(lambda: [verify_partial(public, cts, p, context) for p in partials])
    _, t_single = timed(sk.decrypt_array, aggregate[:sample], count=sample)
    scale = mnist_ciphertexts / sample
    # the proofs' checks are multi-exponentiations, cheaper per ciphertext the more there
    # are: measured on the whole CNN, not scaled from the sample
    proofs = contribution_proofs(public, mnist_ciphertexts)
    partial_mnist = t_partial * scale
    combine_mnist = (t_combine - t_verify) * scale + threshold * proofs["partial_verify_s"]
    single_mnist = t_single * scale
    every_client = clients * single_mnist
    rng = np.random.default_rng(1)
    arrays = [rng.uniform(-0.5, 0.5, shape).astype(np.float32) for shape in cnn.shapes]
    group = GroupKey.of_private_key(sk)
    shell = EncryptedModel(aggregate[:0], pk.fingerprint, params, cnn, run=1, server_round=1,
                           contributors={u: 1 for u in range(1, clients + 1)})
    sealed, t_seal = timed(seal_model, group, shell, arrays, {"train-loss": 0.1})
    (_, opened, _, _), t_open = timed(open_model, group, sealed, run=1)
    assert all(np.array_equal(a, b) for a, b in zip(arrays, opened, strict=True))
    once_cpu = single_mnist + t_seal + (clients - 1) * t_open
    threshold_cpu = threshold * partial_mnist + combine_mnist + t_seal + clients * t_open
    masked = masked_payload(public, shares[:threshold], clients, params, cnn, every_client,
                            t_open)
    out = {
        "threshold": threshold, "shares": clients, "sample_ciphertexts": sample,
        "dealer_s": round(t_deal, 2),
        "encrypt_s_per_ciphertext": round(t_enc / sample, 5),
        "partial_with_proof_s_per_ciphertext": round(t_partial / sample, 5),
        "verify_and_combine_s_per_ciphertext": round(t_combine / sample, 5),
        "single_holder_decrypt_s_per_ciphertext": round(t_single / sample, 5),
        "partial_vs_single_holder_decrypt": round(t_partial / t_single, 1),
        "mnist_cnn_ciphertexts": mnist_ciphertexts,
        "mnist_cnn_partial_s_per_decryptor": round(partial_mnist, 1),
        "mnist_cnn_verify_and_combine_s": round(combine_mnist, 1),
        "mnist_cnn_contribution_proof": proofs,
        "sealed_model": {"bytes": int(sealed["threshold-sealed-model"].nbytes),
                         "float32_bytes": 4 * cnn.size, "seal_s": round(t_seal, 4),
                         "open_s": round(t_open, 4)},
        "mnist_cnn_client_decryption_cpu_per_round_s": {
            "single_holder_every_client_decrypts": round(every_client, 1),
            "single_holder_decrypt_once": round(once_cpu, 1),
            "threshold_decryptors_combiner_and_every_client_opening": round(threshold_cpu, 1),
        },
        "decrypt_once_cpu_vs_today": round(once_cpu / every_client, 3),
        "threshold_cpu_vs_today": round(threshold_cpu / every_client, 2),
        "goal_decrypt_once_cpu_le_one_third_of_today": once_cpu <= every_client / 3,
        "goal_threshold_cpu_le_one_third_of_today": threshold_cpu <= every_client / 3,
        "masked_payload": masked,
    }
    per_ct = out["partial_with_proof_s_per_ciphertext"]
    log(f"threshold {threshold} of {clients}: partial+proof {per_ct} s per ciphertext "
        f"({out['partial_vs_single_holder_decrypt']}x a single-holder decryption); MNIST CNN: "
        f"{partial_mnist:.0f} s per decryptor, verify+combine {combine_mnist:.0f} s; client "
        f"decryption CPU per round {threshold_cpu:.0f} s vs {every_client:.0f} s today "
        f"({out['threshold_cpu_vs_today']}x); decrypt-once {once_cpu:.1f} s "
        f"({out['decrypt_once_cpu_vs_today']}x: seal {t_seal:.3f} s, open {t_open:.3f} s)")
    return out


def masked_payload(public, shares: list, clients: int, params: EncodingParams, cnn: Layout,
                   every_client: float, t_open: float) -> dict:
    """The threshold mode's masked payload (strategies.ring_masks), for real on the whole
    CNN: ``clients`` contributions (quantize, mask, encrypt the secret and the tag, prove),
    checking one contribution's proof, the server's sum, each of the ``len(shares)``
    decryptors' partial decryption with its proof, and the combiner's verification,
    combination, unmasking and decoding; the decoded average is checked against the
    plaintext one. The clients' decryption CPU per round is counted as for the packed
    payload (decryptors' partials, the combiner, sealing, every client opening), and
    once more with the decryptors' checks of every contribution's proof."""
    from strategies.paillier import ciphertexts_from_array
    from strategies.paillier_protocol import aggregate, encrypt_update, read_aggregate
    from strategies.plaintext_proofs import ProvingEncryptor, verify_plaintexts
    from strategies.threshold_paillier import ThresholdEncryptor, combine, partial_decrypt
    from strategies.threshold_protocol import GroupKey, proof_context, seal_model

    group = GroupKey.generate(public.fingerprint)
    tag_key, encryptor = group.tag_key(public.n), ThresholdEncryptor(public)
    rng = np.random.default_rng(2)
    updates, t_client = [], []
    for node in range(1, clients + 1):
        arrays = [rng.uniform(-0.4, 0.4, s).astype(np.float32) for s in cnn.shapes]
        prover = ProvingEncryptor(encryptor)
        start = time.perf_counter()
        model = encrypt_update(arrays, cnn, 1, params, prover, tag_key, run=1, server_round=1,
                               node=node, masked=True)
        proof = prover.prove(model.ciphertexts, proof_context(model))
        t_client.append(time.perf_counter() - start)
        updates.append((arrays, model, proof))
    _, t_check = timed(verify_plaintexts, public, prover.ciphertexts, proof,
                       proof_context(model))
    summed, t_sum = timed(aggregate, public, [m for _, m, _ in updates])
    cts, context = ciphertexts_from_array(public, summed.ciphertexts), b"bench masked"
    partials, t_partials = timed(lambda: [partial_decrypt(s, cts, context) for s in shares])
    start = time.perf_counter()
    plaintexts, left_out = combine(public, cts, partials, context)
    flat, sums = read_aggregate(summed, plaintexts, tag_key)
    t_combine = time.perf_counter() - start
    sealed, t_seal = timed(seal_model, group, summed, flat, sums)
    expected = np.mean([np.concatenate([a.ravel() for a in arrays])
                        for arrays, _, _ in updates], axis=0)
    error = float(np.abs(np.concatenate([a.ravel() for a in flat]) - expected).max())
    assert not left_out and error <= params.max_error(), "the masked aggregate is wrong"
    t_partial = t_partials / len(shares)
    cpu = len(shares) * t_partial + t_combine + t_seal + clients * t_open
    checked = cpu + len(shares) * clients * t_check
    wire = sum(a.nbytes for a in model.to_arrays().values())
    out = {
        "ciphertexts_per_contribution": int(model.ciphertexts.shape[0]),
        "client_encrypt_and_prove_s": round(statistics.mean(t_client), 3),
        "contribution_proof_check_s": round(t_check, 4),
        "server_sum_s": round(t_sum, 3),
        "partial_with_proof_s_per_decryptor": round(t_partial, 3),
        "combine_unmask_decode_s": round(t_combine, 3),
        "seal_s": round(t_seal, 4),
        "max_abs_error": error,
        "wire_bytes_per_contribution": int(wire),
        "wire_ratio_vs_float32": round(wire / (4 * cnn.size), 3),
        "client_decryption_cpu_per_round_s": round(cpu, 2),
        "client_decryption_cpu_per_round_with_checks_s": round(checked, 2),
        "cpu_vs_today": round(cpu / every_client, 3),
        "cpu_with_checks_vs_today": round(checked / every_client, 3),
        "goal_threshold_cpu_le_one_third_of_today": checked <= every_client / 3,
    }
    log(f"threshold, masked payload: {out['ciphertexts_per_contribution']} ciphertexts a "
        f"contribution; client encrypt+prove {out['client_encrypt_and_prove_s']} s, partial "
        f"{t_partial:.2f} s per decryptor, combine+unmask+decode {t_combine:.2f} s; decryption "
        f"CPU per round {checked:.1f} s with the decryptors' checks vs {every_client:.0f} s "
        f"today ({out['cpu_with_checks_vs_today']}x); wire {out['wire_ratio_vs_float32']}x "
        f"float32; max error {error:.3g}")
    return out


def contribution_proofs(public, count: int) -> dict:
    """On ``count`` ciphertexts (the whole CNN): a contributor's proof that it knows its
    plaintexts (strategies.plaintext_proofs; its encryption not counted), checking it
    (the server and every decryptor, per contribution), and checking one decryptor's
    partial-decryption proof (random values stand in for the partials, which take minutes
    to make; the check costs the same, and fails)."""
    from strategies.plaintext_proofs import ProvingEncryptor, verify_plaintexts
    from strategies.threshold_paillier import (InvalidPartial, PartialDecryption,
                                               ThresholdEncryptor, verify_partial)

    prover = ProvingEncryptor(ThresholdEncryptor(public))
    array, t_encrypt = timed(prover.encrypt_to_array,
                             [secrets.randbelow(int(public.n)) for _ in range(count)])
    proof, t_prove = timed(prover.prove, array, b"bench")
    cts = prover.ciphertexts
    _, t_check = timed(verify_plaintexts, public, cts, proof, b"bench")
    stand_in = PartialDecryption(1, tuple(c * c % public.nsquare for c in cts), 1, 1)

    def check_partial():
        try:
            verify_partial(public, cts, stand_in, b"bench")
        except InvalidPartial:
            pass

    _, t_partial = timed(check_partial)
    log(f"contribution proof over {count} ciphertexts: encrypt {t_encrypt:.1f} s, prove "
        f"{t_prove:.2f} s, check {t_check:.2f} s; checking a partial's proof "
        f"{t_partial:.2f} s")
    return {"ciphertexts": count, "encrypt_s": round(t_encrypt, 2),
            "prove_s": round(t_prove, 2), "verify_s": round(t_check, 2),
            "partial_verify_s": round(t_partial, 2)}


CKKS_SLOTS = 4096  # a CKKS vector under polynomial modulus 8192 holds 4096 values
LINKS_MBIT = (1, 10, 100)


def ckks_benchmark(values: np.ndarray, clients: int, agg_values: int,
                   rng: np.random.Generator) -> dict:
    """CKKS (TenSEAL) on ``values``: encrypt and decrypt rates, the serialized bytes
    against float32 and the largest error; homomorphic addition of ``clients`` encrypted
    updates of ``agg_values`` values (values/s of the server's sum) and the error of
    the decrypted sum. NVFlare's default context (poly 8192, [60, 40, 40], 2^40)."""
    import tenseal as ts

    context = ts.context(ts.SCHEME_TYPE.CKKS, poly_modulus_degree=8192,
                         coeff_mod_bit_sizes=[60, 40, 40])
    context.global_scale = 2 ** 40
    chunks = [values[i:i + CKKS_SLOTS] for i in range(0, values.size, CKKS_SLOTS)]
    start = time.perf_counter()
    encrypted = [ts.ckks_vector(context, c) for c in chunks]
    t_encrypt = time.perf_counter() - start
    wire = sum(len(v.serialize()) for v in encrypted)
    start = time.perf_counter()
    decrypted = np.concatenate([np.asarray(v.decrypt()) for v in encrypted])
    t_decrypt = time.perf_counter() - start
    updates = [rng.normal(0.0, 0.05, agg_values) for _ in range(clients)]
    sums = [[ts.ckks_vector(context, u[i:i + CKKS_SLOTS])
             for i in range(0, agg_values, CKKS_SLOTS)] for u in updates]
    start = time.perf_counter()
    total = sums[0]
    for other in sums[1:]:
        total = [a + b for a, b in zip(total, other)]
    t_add = time.perf_counter() - start
    summed = np.concatenate([np.asarray(v.decrypt()) for v in total])
    return {
        "context": {"poly_modulus_degree": 8192, "coeff_mod_bit_sizes": [60, 40, 40],
                    "global_scale_log2": 40, "slots": CKKS_SLOTS},
        "values": int(values.size), "ciphertexts": len(encrypted),
        "encrypt_values_per_s": round(values.size / t_encrypt),
        "decrypt_values_per_s": round(values.size / t_decrypt),
        "add_values_per_s": round((clients - 1) * agg_values / t_add) if clients > 1 else None,
        "wire_bytes": wire, "wire_ratio_vs_float32": round(wire / (4 * values.size), 2),
        "max_abs_error": float(np.abs(decrypted - values).max()),
        "max_abs_error_sum": float(np.abs(summed - np.sum(updates, axis=0)).max()),
    }


def bandwidth_model(params: int, schemes: dict[str, dict]) -> dict:
    """A client's modelled round time per scheme and link: its crypto CPU (encrypting
    its update, decrypting the model it receives) plus (bytes up + bytes down) over the
    link. ``schemes`` maps a name to ``encrypt_s``, ``decrypt_s``, ``bytes_up`` and
    ``bytes_down`` for a model of ``params`` values. Training time is left out: it is
    the same in every scheme."""
    rows = {}
    for name, f in schemes.items():
        cpu = f["encrypt_s"] + f["decrypt_s"]
        rows[name] = {"crypto_cpu_s": round(cpu, 2), "bytes_up": f["bytes_up"],
                      "bytes_down": f["bytes_down"],
                      **{f"{mbit}_mbit_s": round(cpu + 8 * (f["bytes_up"] + f["bytes_down"])
                                                 / (mbit * 1e6), 2) for mbit in LINKS_MBIT}}
    return {"params": params, "links_mbit": list(LINKS_MBIT), "client_round_seconds": rows,
            "left_out": "training time (the same in every scheme); the decryptors' work in "
                        "the decrypt-once and threshold modes (a client that decrypts, see "
                        "threshold.mnist_cnn_client_decryption_cpu_per_round_s)"}


def simulate_mnist(args: argparse.Namespace) -> dict:
    """Plaintext, Paillier and threshold Paillier (``--threshold`` of ``--sim-clients``
    shares, the default masked payload) MNIST simulations with the same settings, back
    to back."""
    import tempfile

    from fedapp import launch
    from strategies.keyfiles import (KEY_DIR_ENV, THRESHOLD_PUBLIC_NAME, write_keypair,
                                     write_simulation_identities, write_threshold_key)
    from strategies.node_settings import NODE_CONFIG_ENV, PLAINTEXT_METRICS

    work = Path(tempfile.mkdtemp(prefix="bench-paillier-"))
    public, private, _ = write_keypair(work / "keys")
    n = args.sim_clients
    threshold_keys = work / "threshold-keys"
    write_threshold_key(threshold_keys, args.threshold, n)
    write_simulation_identities(threshold_keys, n)
    common = {"task": "mnist", "data-dir": str(Path(args.data_dir).resolve()),
              "num-server-rounds": args.sim_rounds, "min-available-nodes": n,
              "min-train-nodes": n, "min-evaluate-nodes": n, "local-epochs": 1,
              "batch-size": 32, "central-eval": False}
    # weights: examples in units of 512 (about 12 per client), total at most 128: 23-bit
    # slots, 89 per ciphertext, the 1.44x wire size measured above; the nodes release
    # their evaluation metrics (plaintext-metrics), so the accuracies compare
    paillier = {"aggregation": "paillier", "paillier-public-key": str(public),
                "paillier-weight-unit": 512, "paillier-max-total-weight": 128,
                "plaintext-metrics": True}
    threshold = {**paillier, "aggregation": "paillier-threshold",
                 "paillier-public-key": str(threshold_keys / THRESHOLD_PUBLIC_NAME)}
    out = {"settings": common, "paillier-settings": {k: v for k, v in paillier.items()
                                                     if k != "paillier-public-key"},
           "node-config": f"{PLAINTEXT_METRICS}=true",
           "threshold": f"{args.threshold} of {n} shares, masked payload"}
    for name, extra, keys in (("plaintext", {}, private.parent),
                              ("paillier", paillier, private.parent),
                              ("paillier_threshold", threshold, threshold_keys)):
        log(f"simulation: {name} MNIST, {n} clients, {args.sim_rounds} rounds")
        status, run_dir, logs = launch.simulate(
            ROOT, work / name, n, {**common, **extra}, timeout=4 * 3600,
            env={KEY_DIR_ENV: str(keys), NODE_CONFIG_ENV: f"{PLAINTEXT_METRICS}=true"})
        rows = json.loads((run_dir / "metrics.json").read_text()) if run_dir else []
        later = [r for r in rows if r["round"] > 1]
        out[name] = {
            "status": status,
            "seconds_per_round": round(statistics.mean(r["seconds"] for r in later), 2) if later else None,
            "round_seconds": [r["seconds"] for r in rows],
            "bytes_up_per_round": rows[-1]["bytes-up"] if rows else None,
            "bytes_down_per_round": rows[-1]["bytes-down"] if rows else None,
            "final_fed_accuracy": rows[-1].get("fed-accuracy") if rows else None,
        }
        if status != launch.FINISHED_OK:
            log(logs[-4000:])
        log(f"{name}: {json.dumps(out[name])}")
    p = out["plaintext"]
    for name in ("paillier", "paillier_threshold"):
        c = out[name]
        out[f"ratio_seconds_per_round_{name}"] = round(
            c["seconds_per_round"] / p["seconds_per_round"], 2) \
            if p["seconds_per_round"] and c["seconds_per_round"] else None
        out[f"ratio_bytes_up_{name}"] = round(c["bytes_up_per_round"] / p["bytes_up_per_round"],
                                              3) \
            if p["bytes_up_per_round"] and c["bytes_up_per_round"] else None
        out[f"accuracy_difference_points_{name}"] = round(
            100 * (c["final_fed_accuracy"] - p["final_fed_accuracy"]), 2) \
            if p["final_fed_accuracy"] is not None and c["final_fed_accuracy"] is not None \
            else None
    return out


if __name__ == "__main__":
    from fedapp import launch

    launch.stop_on_sigterm()  # a stopped benchmark stops what it started
    main()
