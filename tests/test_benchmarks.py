"""Smoke tests of the benchmark suite: its core functions on tiny shapes with one repetition,
and the files it writes (no assertions on timings)."""
import copy
import json
import math
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from benchmarks import allocators, bench_detector, bench_export, bench_grid_sample, bench_metrics, bench_refine, run_all
from benchmarks.bench_grid_sample import FORWARD, FORWARD_BACKWARD, SampleCase
from benchmarks.device_info import resolve_device, slugify
from benchmarks.reporting import PLOT_FILES, RESULTS_JSON, RESULTS_MD, results_markdown
from benchmarks.timing import PeakMemory, TimingSettings, measure, measure_interleaved

CPU = torch.device("cpu")
REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ONE_REP = TimingSettings(warmup=0, min_reps=1, max_reps=1, budget_s=0.0)

TINY_CASES = [
    SampleCase("global", "global B=2", (1, 8, 4, 4), (2, 1, 1, 2), batch=2, reference_grid_shape=(1, 2, 1, 2)),
    SampleCase("global (1,B,1,2)", "global B=2 (1,B,1,2)", (1, 8, 4, 4), (1, 2, 1, 2), batch=2),
    SampleCase("local", "local B=1", (1, 4, 8, 8), (1, 3, 3, 2), batch=1),
    SampleCase("local", "local B=2", (1, 4, 8, 8), (2, 3, 3, 2), batch=2),
    SampleCase("1-D", "1-D", (2, 3, 5), (2, 4, 1)),
    SampleCase("4-D", "4-D", (1, 2, 2, 2, 2, 2), (1, 2, 2, 2, 2, 4)),
    SampleCase("deterministic", "local B=2 deterministic", (1, 4, 8, 8), (2, 3, 3, 2), batch=2, deterministic=True,
               directions=(FORWARD_BACKWARD,)),
    SampleCase("jitter", "local B=2 jitter", (1, 4, 8, 8), (2, 3, 3, 2), batch=2, jitter=True),
]
TINY_SPEC = bench_detector.DetectorSpec("tiny lite", "lite-demo", "random", infer_batches=(1, 2), train_batch=2,
                                        model_overrides=(("input_size", 32), ("num_blocks", 1)))
TINY_REFINE = bench_refine.BenchConfig(batch=2, channels=4, height=3, width=3, warmup=0, repeats=1)
TINY_METRICS = bench_metrics.MetricsCase(images=4, side=16)


@pytest.fixture(scope="module")
def suite(tmp_path_factory):
    out = tmp_path_factory.mktemp("results")
    folder, results = run_all.run_suite(str(out), CPU, grid_cases=TINY_CASES, detector_specs=[TINY_SPEC],
                                        refine=TINY_REFINE, metrics=TINY_METRICS, kernel_timing=ONE_REP,
                                        model_timing=ONE_REP,
                                        roof_sizes=(1 << 20, 32), progress=False)
    return out, folder, results


# ---- the files ------------------------------------------------------------------------------

def test_results_folder_is_named_after_the_device(suite):
    out, folder, results = suite
    assert os.path.dirname(folder) == str(out)
    assert os.path.basename(folder).startswith("cpu-")
    assert os.path.basename(folder) == results["environment"]["device_slug"]


def test_results_json_is_complete(suite):
    _, folder, _ = suite
    with open(os.path.join(folder, RESULTS_JSON), encoding="utf-8") as handle:
        data = json.load(handle)
    env = data["environment"]
    assert env["torch"] == torch.__version__
    assert env["torch_threads"] == torch.get_num_threads()
    assert env["git"]["commit"] is None or len(env["git"]["commit"]) == 40
    assert data["roofs"]["copy_bandwidth"]["gbps"] > 0 and data["roofs"]["matmul"]["gflops"] > 0
    rows = data["grid_sample"]
    expected = [(c.label, d) for c in TINY_CASES for d in c.directions]
    assert [(r["label"], r["direction"]) for r in rows] == expected
    for r in rows:
        assert r["ext_ms"] > 0 and r["reference_ms"] > 0
        assert r["speedup"] == pytest.approx(r["reference_ms"] / r["ext_ms"])
        assert r["ext_gbps"] == pytest.approx(r["bytes"] / (r["ext_ms"] / 1e3) / 1e9)
        assert r["ext_copy_fraction"] == pytest.approx(r["ext_gbps"] / data["roofs"]["copy_bandwidth"]["gbps"])
        assert r["ext_reps"] == r["reference_reps"] == 1
    # detector: batch 1 and 2 inference both ways, one training step, for both kernels
    det_rows = data["detector"]["specs"][0]["rows"]
    measured = {(r["kernels"], r["phase"], r["batch"]) for r in det_rows}
    for kernels in ("ext", "reference"):
        for batch in (1, 2):
            assert (kernels, bench_detector.INFER_FEATURES, batch) in measured
            assert (kernels, bench_detector.INFER_IMAGES, batch) in measured
        assert (kernels, bench_detector.TRAIN_STEP, 2) in measured
    assert len(data["detector"]["speedups"]) == 5
    assert all(r["peak_mb"] > 0 for r in det_rows)
    size = data["detector"]["specs"][0]["size"]
    assert size["parameters"] == sum(v for k, v in size["parameter_breakdown"].items() if k != "total")
    assert size["feature_shape"] == [152, 4, 4]  # Lite0: 40 + 112 channels at 32 / 8
    assert data["refine"]["status"] == "ok" and len(data["refine"]["rows"]) == 2
    refine_rows = {r["direction"]: r for r in data["refine"]["rows"]}
    elements = 2 * 4 * 3 * 3  # TINY_REFINE: B·C·H·W
    assert refine_rows["forward+backward"]["bytes"] == 4 * 5 * elements  # rec, feat twice; grad rec once
    assert all(r["ext_gbps"] > 0 and 0 < r["ext_copy_fraction"] for r in refine_rows.values())
    assert any("random weights" in note for note in data["notes"])
    scored = data["metrics"]
    assert scored["status"] == "ok" and scored["case"] == {"images": 4, "side": 16, "seed": 0}
    assert scored["pixels"] == 4 * 16 * 16 and scored["reps"] == 1 and scored["ms"] > 0
    assert scored["mpixels_per_s"] == pytest.approx(scored["pixels"] / (scored["ms"] / 1e3) / 1e6)


def markdown_tables(text):
    """The tables of a markdown text (lists of row lines), each checked: every row has as many
    cells as its header, and the second row is the separator."""
    tables, current = [], []
    for line in text.splitlines() + [""]:
        if line.startswith("|"):
            current.append(line)
        elif current:
            tables.append(current)
            current = []
    for table in tables:
        widths = {row.replace("\\|", "").count("|") for row in table}
        assert len(widths) == 1, table
        assert set(table[1].strip("|").split("|")) == {"---"}
    return tables


def test_results_markdown_has_a_row_per_measurement(suite):
    _, folder, results = suite
    with open(os.path.join(folder, RESULTS_MD), encoding="utf-8") as handle:
        text = handle.read()
    assert text.splitlines()[0].startswith("# ")
    tables = markdown_tables(text)
    grid_table = next(t for t in tables if "ext GB/s" in t[0])
    assert len(grid_table) - 2 == len(results["grid_sample"])
    for case in TINY_CASES:
        assert f"| {case.label} |" in text
    assert "## metrics: gradad.metrics.compute_metrics" in text and "| 4×16×16 |" in text
    for file in PLOT_FILES.values():
        assert f"({file})" in text


def test_results_name_the_allocator_both_sides_ran_under(suite):
    _, folder, results = suite
    assert results["environment"]["allocator"] == allocators.current_allocator()
    with open(os.path.join(folder, RESULTS_MD), encoding="utf-8") as handle:
        text = handle.read()
    assert f"| CPU memory allocator | {allocators.current_allocator()['title']}" in text


def test_allocator_runs_are_merged_side_by_side(suite, tmp_path):
    # Two runs of the same cases under different settings (the second's times made up here):
    # every row keeps the first run's figures and gets the second's beside it.
    _, _, results = suite
    first = copy.deepcopy(results)
    first["environment"]["allocator"] = allocators.current_allocator({})
    second = copy.deepcopy(results)
    second["environment"]["allocator"] = allocators.current_allocator({"GLIBC_TUNABLES": allocators.GLIBC_TUNED})
    rows_of = {"grid_sample": lambda r: r["grid_sample"], "refine": lambda r: r["refine"]["rows"],
               "detector": lambda r: r["detector"]["speedups"]}
    for rows in rows_of.values():
        for i, row in enumerate(rows(second)):
            row["ext_ms"], row["reference_ms"], row["speedup"] = 1.0 + i, 3.0 * (1.0 + i), 3.0
    del second["grid_sample"][-1]  # a case the second run lacks stays without its column
    merged = run_all.merge_allocator_runs([("glibc", first), ("glibc-tuned", second)])
    assert [a["name"] for a in merged["allocators"]] == ["glibc", "glibc-tuned"]
    assert merged["allocators"][1]["GLIBC_TUNABLES"] == allocators.GLIBC_TUNED
    for part, rows in rows_of.items():
        for i, (row, original) in enumerate(zip(rows(merged), rows(first))):
            assert row["speedup"] == original["speedup"] and row["ext_ms"] == original["ext_ms"]
            if part == "grid_sample" and i == len(rows(merged)) - 1:
                assert "by_allocator" not in row
                continue
            assert row["by_allocator"]["glibc-tuned"]["ext_ms"] == 1.0 + i
            assert row["by_allocator"]["glibc-tuned"]["speedup"] == 3.0
    assert merged["wall_time_s"] == pytest.approx(first["wall_time_s"] + second["wall_time_s"])
    text = results_markdown(merged)
    tables = markdown_tables(text)
    grid_table = next(t for t in tables if "ext GB/s" in t[0])
    header = [c.strip() for c in grid_table[0].strip("|").split("|")]
    assert "speed-up, glibc (default)" in header and "speed-up, glibc tuned" in header
    first_row = [c.strip() for c in grid_table[2].strip("|").split("|")]
    assert first_row[header.index("speed-up, glibc tuned")] == "3.00×"
    assert first_row[header.index("ext / ref ms, glibc tuned")] == "1.000 / 3.000"
    assert sum("speed-up, glibc tuned" in t[0] for t in tables) == 3  # grid_sample, detector, refine
    assert "every case runs under each" in text


def test_allocator_settings_replace_the_parents(tmp_path, monkeypatch):
    parent = {"LD_PRELOAD": "/somewhere/libother.so", "GLIBC_TUNABLES": "glibc.malloc.arena_max=1", "KEEP": "1"}
    plain = allocators.allocator_env("glibc", parent)
    assert plain == {"KEEP": "1"}
    tuned = allocators.allocator_env("glibc-tuned", parent)
    assert tuned == {"KEEP": "1", "GLIBC_TUNABLES": allocators.GLIBC_TUNED}
    assert allocators.current_allocator(tuned)["name"] == "glibc-tuned"
    assert allocators.current_allocator(parent)["name"] == "custom"
    with pytest.raises(ValueError, match="allocator must be one of"):
        allocators.allocator_env("mimalloc", parent)
    with pytest.raises(ValueError, match="without repeats"):
        allocators.check_settings(["glibc", "glibc"])
    monkeypatch.setattr(allocators, "LIBRARY_GLOBS", (str(tmp_path),))
    with pytest.raises(FileNotFoundError, match="apt-get install libjemalloc2"):
        allocators.allocator_env("jemalloc", parent)


_CHILD = """
import ctypes, json
from benchmarks.allocators import current_allocator
libc = ctypes.CDLL("libc.so.6")
libc.malloc.restype = ctypes.c_void_p
libc.free.argtypes = [ctypes.c_void_p]
class MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in
                ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks",
                 "keepcost")]
libc.mallinfo2.restype = MallInfo2
libc.free(libc.malloc(64 << 20))
with open("/proc/self/maps") as maps:
    libraries = sorted({line.split()[-1] for line in maps if ".so" in line})
print(json.dumps({"allocator": current_allocator(), "heap_bytes": libc.mallinfo2().arena, "libraries": libraries}))
"""


@pytest.mark.parametrize("name", sorted(allocators.SETTINGS))
def test_a_child_process_runs_under_the_setting(name):
    # What run_all's children get: the setting's name in their results, and the allocator itself
    # (the preloaded library mapped; glibc tuned keeping a freed 64 MiB block in its heap, where
    # glibc as it comes hands such a block back to the OS at once).
    env = allocators.allocator_env(name)
    env["PYTHONPATH"] = os.pathsep.join([REPO_ROOT, env.get("PYTHONPATH", "")])
    done = subprocess.run([sys.executable, "-c", _CHILD], env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    child = json.loads(done.stdout)
    assert child["allocator"]["name"] == name
    library = allocators.SETTINGS[name].library
    preloaded = [lib for lib in child["libraries"] if "jemalloc" in lib or "tcmalloc" in lib]
    assert [os.path.realpath(lib) for lib in preloaded] == (
        [os.path.realpath(allocators.find_library(library))] if library else [])
    if name == "glibc-tuned":
        assert child["heap_bytes"] >= 64 << 20
    elif name == "glibc":
        assert child["heap_bytes"] < 64 << 20


def test_plots_are_valid_pngs(suite):
    _, folder, _ = suite
    for file in PLOT_FILES.values():
        path = os.path.join(folder, file)
        with Image.open(path) as image:
            image.verify()
        with Image.open(path) as image:
            assert image.format == "PNG" and image.size[0] > 100 and image.size[1] > 100


def test_no_temporary_files_are_left(suite):
    _, folder, _ = suite
    expected = {RESULTS_JSON, RESULTS_MD, *PLOT_FILES.values()}
    assert set(os.listdir(folder)) == expected


# ---- core functions -------------------------------------------------------------------------

def test_default_cases_are_the_issue_shapes():
    cases = {c.label: c for c in bench_grid_sample.default_cases(CPU)}
    for b in (1, 16, 64):
        assert cases[f"global B={b}"].input_shape == (1, 216 * 28 * 28, 4, 4)
        assert cases[f"global B={b}"].grid_shape == (b, 1, 1, 2)  # the model's form, the headline
        assert cases[f"global B={b}"].reference_grid_shape == (1, b, 1, 2)  # against the reference code's
        assert cases[f"global B={b} (1,B,1,2)"].grid_shape == (1, b, 1, 2)
        assert cases[f"local B={b}"].input_shape == (1, 216, 8, 8)
        assert cases[f"local B={b}"].grid_shape == (b, 28, 28, 2)
    groups = {c.group for c in cases.values()}
    assert {"drop-in 2-D", "drop-in 3-D", "1-D", "4-D", "deterministic", "jitter"} <= groups
    assert all(c.dtype == "float32" for c in cases.values())  # bfloat16 only on CUDA
    assert cases["local B=64"].reference_name == "F.grid_sample(table.repeat(B))"
    assert cases["global B=64 (1,B,1,2)"].reference_name == "F.grid_sample"
    assert cases["global B=64"].reference_name == "F.grid_sample on a (1, 64, 1, 2) grid, transposed"


def test_bytes_moved_by_hand():
    case = SampleCase("local", "local", (1, 4, 8, 8), (2, 3, 3, 2))
    # P = 18 points, C = 4, d = 2, table T = 256 elements, corners touched 18 * 4 * 4 = 288 > T
    forward = 256 + 18 * 2 + 18 * 4
    backward = 18 * 4 + 18 * 2 + 256 + 256 + 18 * 2
    assert bench_grid_sample.bytes_moved(case, FORWARD) == 4 * forward
    assert bench_grid_sample.bytes_moved(case, FORWARD_BACKWARD) == 4 * (forward + backward)
    # a large table sampled at few points: only the touched corners count as read
    sparse = SampleCase("global", "global", (1, 100, 4, 4), (1, 1, 1, 2))
    assert bench_grid_sample.bytes_moved(sparse, FORWARD) == 4 * (100 * 4 + 2 + 100)
    assert bench_grid_sample.flops(case, FORWARD) == 2 * 4 * 18 * 4


def test_bad_cases_are_rejected():
    with pytest.raises(ValueError, match="grid"):
        SampleCase("x", "x", (1, 4, 8, 8), (2, 3, 3, 3))
    with pytest.raises(ValueError, match="batch"):
        SampleCase("x", "x", (3, 4, 8, 8), (2, 3, 3, 2))
    with pytest.raises(ValueError, match="directions"):
        SampleCase("x", "x", (1, 4, 8, 8), (2, 3, 3, 2), directions=("sideways",))
    with pytest.raises(ValueError, match="reference_grid_shape"):
        SampleCase("x", "x", (1, 4, 8, 8), (2, 1, 1, 2), reference_grid_shape=(1, 3, 1, 2))


@pytest.mark.parametrize("case", [c for c in TINY_CASES if not c.jitter], ids=lambda c: c.label)
def test_both_sides_compute_the_same_sampling(case):
    """The benchmark compares like with like: ext and reference sides agree with F.grid_sample
    (2-D) or with each other (1-D, 4-D)."""
    gen = torch.Generator().manual_seed(0)
    table = torch.randn(case.input_shape, generator=gen, dtype=torch.float64)
    grid = torch.rand(case.grid_shape, generator=gen, dtype=torch.float64) * 2.2 - 1.1
    ext = bench_grid_sample.ext_sampler(case)(table, grid)
    ref = bench_grid_sample.reference_sampler(case)(table, grid)
    torch.testing.assert_close(ext, ref)
    if case.dim == 2:
        expanded = table.expand(case.grid_shape[0], *table.shape[1:])
        torch.testing.assert_close(ext, F.grid_sample(expanded, grid, align_corners=False))


def test_measure_repetitions_follow_the_settings():
    calls = []
    timing = measure(calls.append, CPU, TimingSettings(warmup=2, min_reps=3, max_reps=4, budget_s=0.0))
    assert calls == [0, 1, 2, 3, 4]  # 2 warm-up + 3 timed, running index for input rotation
    assert timing.reps == 3 and timing.min_s <= timing.median_s <= timing.max_s
    calls.clear()
    measure(calls.append, CPU, TimingSettings(warmup=0, min_reps=1, max_reps=6, budget_s=1e6))
    assert len(calls) == 6


def test_interleaved_sides_alternate():
    calls = []
    steps = {"a": lambda i: calls.append(("a", i)), "b": lambda i: calls.append(("b", i))}
    timings, memory = measure_interleaved(steps, CPU, TimingSettings(warmup=1, min_reps=2, max_reps=2, budget_s=0.0),
                                          peak_memory=True)
    assert calls == [("a", 0), ("b", 0), ("a", 1), ("b", 1), ("a", 2), ("b", 2)]
    assert timings["a"].reps == timings["b"].reps == 2
    assert set(memory) == {"a", "b"} and all(m.peak_bytes > 0 for m in memory.values())
    with pytest.raises(ValueError):
        TimingSettings(warmup=0, min_reps=3, max_reps=2, budget_s=1.0)


def test_peak_memory_sees_an_allocation():
    size = 256 << 20
    with PeakMemory(CPU) as memory:
        block = torch.ones(size // 4)  # written, so resident
        del block
    assert memory.increase_bytes >= 0.8 * size
    assert memory.peak_bytes >= memory.increase_bytes


def test_cpu_batch_reduction():
    spec = bench_detector.DetectorSpec("s", "grad", "random", cpu_max_batch=4)
    assert spec.batch_on(CPU, 32) == 4 and spec.batch_on(CPU, 2) == 2
    assert spec.batch_on(torch.device("cuda"), 32) == 32  # only CPU runs are reduced
    assert bench_detector.DetectorSpec("s", "grad", "random").batch_on(CPU, 64) == 64
    with pytest.raises(ValueError, match="positive"):
        bench_detector.DetectorSpec("s", "grad", "random", cpu_max_batch=0)


def test_speedups_pair_ext_with_reference():
    def row(kernels, phase, batch, ms):
        return {"spec": "s", "precision": "float32", "compiled": False, "phase": phase, "batch": batch,
                "requested_batch": batch, "kernels": kernels, "ms": ms, "min_ms": ms, "peak_increase_mb": 1.0}
    rows = [row("ext", "p", 1, 2.0), row("reference", "p", 1, 6.0), row("ext", "p", 4, 5.0),
            row("reference", "q", 4, 1.0)]
    out = bench_detector.speedups(rows)
    assert len(out) == 1 and out[0]["batch"] == 1 and math.isclose(out[0]["speedup"], 3.0)


def test_slugs_and_devices():
    assert slugify("NVIDIA H100 80GB HBM3") == "nvidia-h100-80gb-hbm3"
    assert slugify("AMD EPYC 7B13 64-Core Processor") == "amd-epyc-7b13-64-core-processor"
    assert resolve_device("cpu") == CPU
    with pytest.raises(ValueError, match="device"):
        resolve_device("tpu")
    if not torch.cuda.is_available():
        with pytest.raises(RuntimeError, match="no CUDA"):
            resolve_device("cuda")


def test_run_suite_rejects_unknown_parts(tmp_path):
    with pytest.raises(ValueError, match="parts"):
        run_all.run_suite(str(tmp_path), CPU, parts=["grid_sample", "bogus"])
    with pytest.raises(SystemExit):
        run_all.main(["--only", "bogus"])


def test_bigrid_synthetic_dataset_is_an_mvtec_class_with_masks_on_the_defects(tmp_path):
    from benchmarks import bigrid_vs_grad_synthetic as synthetic
    from gradad.datasets import list_dataset, load_mask

    root = synthetic.make_dataset(str(tmp_path), n_train=2, n_test=6, seed=0)
    train = list_dataset("mvtec", root, "train", None)
    test = list_dataset("mvtec", root, "test", None)
    assert len(train) == 2 and all(r.label == 0 for r in train)
    assert sorted(r.label for r in test) == [0, 0, 1, 1, 1, 1]
    for record in test:
        mask = load_mask(record)
        if record.label == 0:
            assert mask is None or not mask.any()
        else:  # a defect covers a small part of the image
            assert 0 < mask.mean() < 0.05


def test_allocator_report_compares_each_setting_with_glibc():
    from benchmarks import bench_allocators

    runs = {"glibc": {w: [4.0, 2.0] for w in bench_allocators.WORK},
            "glibc-tuned": {w: [1.0, 3.0] for w in bench_allocators.WORK}}
    results = {"environment": {"cpu": "test CPU", "torch": torch.__version__, "load_average": [0.1, 0.1, 0.1]},
               "load_average_end": [0.2, 0.2, 0.2], "runs": runs,
               "allocators": {"glibc": allocators.current_allocator({}),
                              "glibc-tuned": allocators.current_allocator({"GLIBC_TUNABLES": allocators.GLIBC_TUNED})},
               "case": {"threads": 2, "rounds": 2, "images": 10, "train_images": 20, "training": "t", "predict": "p"}}
    text = bench_allocators.to_markdown(results)
    tables = markdown_tables(text)
    rows = [[c.strip() for c in row.strip("|").split("|")] for row in tables[0][2:]]
    assert len(rows) == 2 * len(bench_allocators.WORK)
    for work, name, best, speed, every in rows:
        assert best == ("2.00" if name == "glibc" else "1.00")  # the best round
        assert speed == ("1.00×" if name == "glibc" else "2.00×")
    per_image = [[c.strip() for c in row.strip("|").split("|")] for row in tables[1][2:]]
    assert per_image[1] == ["glibc-tuned", "20.0", "20.0", "10.0", "10.0"]
    assert allocators.GLIBC_TUNED in text


def test_allocator_benchmark_rejects_bad_arguments(capsys):
    from benchmarks import bench_allocators

    with pytest.raises(SystemExit):
        bench_allocators.main(["--allocators", "mimalloc"])
    assert "--allocators" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        bench_allocators.main(["--rounds", "0"])


def test_export_targets_are_judged_best_against_best_at_batch_32():
    def row(runtime, precision, batch, images_per_s, auroc=None, streams=1):
        return {"spec": bench_export.TRAINED_SPEC, "runtime": bench_export.RUNTIMES[runtime], "precision": precision,
                "streams": streams, "batch": batch, "requested_batch": batch, "input_size": 240,
                "median_ms": 1000 * batch / images_per_s, "images_per_s": images_per_s, "auroc_fp32": 0.9,
                "auroc": auroc, "max_score_change": 1.0}
    rows = [row("onnxruntime", "fp32", 1, 50.0), row("onnxruntime", "fp32", 32, 90.0),
            row("onnxruntime", "fp32", 32, 100.0, streams=2),
            row("onnxruntime", "int8", 1, 500.0, 0.85), row("onnxruntime", "int8", 32, 150.0, 0.899),
            row("onnxruntime", "int8", 32, 120.0, 0.899, streams=2),
            row("openvino", "int8", 32, 190.0, 0.894), row("openvino", "int8", 32, 200.0, 0.894, streams=2)]
    table = bench_export.target_table(rows)
    # batch 32 only, each runtime's fastest int8 row against the fastest fp32 onnxruntime row (100
    # images/s with 2 streams): 1.5x and 2.0x; drops 0.001 and 0.006
    assert "| target (batch 32) | onnxruntime int8, streams 1 | openvino int8, streams 2 |" in table
    assert "| images/s ≥ 2× fastest fp32 onnxruntime (100.0) | 1.50×, not met | 2.00×, met |" in table
    assert "| image AUROC drop ≤ 0.005 | +0.0010, met | +0.0060, not met |" in table
    assert bench_export.target_table([r for r in rows if r["precision"] == "int8"]) is None
    markdown = bench_export.to_markdown({"device": "cpu-x", "threads": 2, "rows": rows})
    assert "Targets of the quantized export" in markdown and table in markdown
    # the precisions table: the speed-up of each row against the same fastest fp32 row
    assert "| onnxruntime | fp32 | 1 | 32 | 355.6 | 90.0 | 0.90× |" in markdown
    assert "| openvino | int8 | 2 | 32 | 160.0 | 200.0 | 2.00× |" in markdown


def test_peers_int8_cells_say_how_many_seeds_stand_behind_them():
    from benchmarks import bench_peers

    one = bench_peers._mean_sd([0.942])
    three = bench_peers._mean_sd([0.94, 0.95, 0.96])
    assert bench_peers._fmt_ms(one) == "0.942 (1 seed)"
    assert bench_peers._fmt_ms(three) == "0.950 ± 0.010"
    refused = [{"seed": 0, "reason": "refused", "message": "drop"}, {"seed": 1, "reason": "refused", "message": "d"}]
    assert bench_peers._fmt_int8(one, {"excluded": refused}) == "0.942 (1 seed); 2 refused"
    assert bench_peers._fmt_int8(bench_peers._mean_sd([]), {"excluded": refused}) == "refused"
    assert bench_peers._fmt_int8(three, {"excluded": []}) == "0.950 ± 0.010"
    assert bench_peers._fmt_int8(None, {}) == "—"
