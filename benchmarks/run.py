"""ckptkit against what users would otherwise write, side by side in one run.

    python benchmarks/run.py [--quick] [--reps 3] [--json out.json] [--threads N] [--device auto|cpu|gpu]
                             [--only loop,savecost,savegap,position,finite,overhead,io,resume,lost,lostbig,
                                     growth,tiers,d2h]
                             [--growth-sizes 64,256,1024,2048]

1. loop      steps/s of a small MLP (64 inputs, batch 64, data shuffled every epoch with
             ckptkit.data.shuffle): a hand-written tf.function step in a Python loop, the same
             with 100 steps fused in one tf.function, Keras fit with steps_per_execution 1 and
             100, and the ckptkit Trainer at its defaults, at steps_per_loop=1, without
             periodic saves, with a 4096-element shuffle buffer and with synchronous saves
             (saving every 1000 steps);
             peers saving every 1000 steps too: Keras fit with BackupAndRestore +
             ModelCheckpoint, and orbit's Controller with a CheckpointManager (when orbit
             imports: pip install --no-deps tf-models-official).
   savecost  where one save of that trainer goes: the data iterator's snapshot, the blocking
             save() call, and a complete save with and without the data iterator (wall and
             CPU time, writer thread included).
   savegap   a periodic save inside the Trainer's loop, async and sync: the time between the
             loop calls around it, and how much longer the next loop call takes.
   position  (benchmarks/position.py) the data position's bytes and snapshot time against the
             example size (4 B, 4 kB, 400 kB) and the dataset size, saved symbolically (the
             Trainer's way) and with its buffers; target: <= 4 kB and <= 1 ms per save.
   finite    the check that every weight is finite, which the Trainer runs before each save
             (one fused reduction, one read to the host), against one bare synchronous
             Checkpoint.write of the same variables: the large model of 2. and workload 1's
             MLP with its Adam slots.
2. overhead  training throughput of a large model (--mb of float32 variables, SGD) saving every
             few seconds, as a fraction of the same loop without checkpoints: ckptkit async,
             ckptkit sync, a hand-written loop with tf.train.CheckpointManager.save, Keras fit
             with ModelCheckpoint(save_weights_only); and the blocking time per save.
3. io        save and restore of the same variables: ckptkit vs bare tf.train.Checkpoint
             write/read vs the disk's own sequential write (+fsync) and read of that many bytes.
4. resume    seconds from process start to the first training step of a resumed run: ckptkit
             vs a hand-written script restoring with tf.train.CheckpointManager.
6. lost      work lost per kill -9 against the overhead of saving (benchmarks/lost.py): fixed
             periods (every 1000 steps, every 10 s, every 5 minutes modelled), save_every_seconds=auto
             at 1% and 2%, and Keras BackupAndRestore, on workload 1's MLP (lost) and on a --mb
             model (lostbig): median and worst steps lost per kill over 2000 kill instants a run,
             throughput against no periodic save. Targets: auto's overhead within its budget, and
             auto losing less per kill than every fixed period that costs as much or more.
7. growth    one save as the model grows (benchmarks/growth.py; --growth-sizes, 64 MB to 2 GB):
             the disk's own write, a bare Checkpoint.write, the same in 4 shards
             (experimental_sharding_callback), ckptkit sync and async (and the async save's
             blocking part); target: ckptkit's save at 1 GB >= 0.9x the bare write.
8. tiers     a local tier on /dev/shm against checkpoint.dir alone (benchmarks/tiers.py), a --mb
             model saving every 10 s and with save_every_seconds=auto: saves per minute, copies
             to disk per minute, and the steps a kill -9 loses when the run comes back on the
             same node and on another one; then a crashed tiered run relaunched on this host and
             on another (host name patched, its own empty local_dir). Targets: each resumes from
             the right tier; auto saves at least as often with the local tier.
5. d2h       (with --device gpu, or named in --only) GB/s of the part of an async save that
             blocks training, against a plain device-to-host copy of the same variables and
             the finite check alone. Without a GPU, --device gpu prints "no GPU" and stops;
             --only d2h then copies host to host, which checks the code, not a GPU.

One module per section: workload_loop.py (1), savetime.py (1b, 1d), finite.py (1c),
position.py (1e), overhead.py (2), throughput.py (3), resume_latency.py (4), d2h.py (5),
lost.py (6), growth.py (7), tiers.py (8);
harness.py holds the repetitions, medians, spreads, tables and targets; this file parses the
options and runs the sections asked for.

The issue's targets are printed under their tables as met or MISSED (and stored in --json).

Contenders alternate within each repetition; the table shows medians, ratios, and the spread
of the repetitions (half their range over the median: how noisy the machine was). ``--quick``
shrinks every workload to a smoke run (CI runs it to check the script works, not its numbers).
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import tensorflow as tf  # noqa: E402
from d2h import bench_d2h  # noqa: E402
from finite import bench_finite  # noqa: E402
from growth import bench_growth, growth_targets  # noqa: E402
from harness import check_targets, print_table  # noqa: E402
from lost import bench_lost, lost_targets  # noqa: E402
from overhead import bench_overhead  # noqa: E402
from resume_latency import bench_resume  # noqa: E402
from savetime import bench_savecost, bench_savegap  # noqa: E402
from throughput import bench_io  # noqa: E402
from workload_loop import bench_loop  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny workloads, 1 repetition (smoke run)")
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--mb", type=int, default=256, help="size of the large model's variables")
    parser.add_argument(
        "--only", default="loop,savecost,savegap,position,finite,overhead,io,resume,lost,lostbig,growth"
    )
    parser.add_argument("--growth-sizes", default="64,256,1024,2048", help="model sizes (MB) of section 7")
    parser.add_argument("--json", help="write the raw figures here")
    parser.add_argument(
        "--device",
        choices=("auto", "cpu", "gpu"),
        default="auto",
        help="gpu: run on the first GPU (and time device-to-host copies), or say "
        "'no GPU' and stop; cpu: hide GPUs; auto: TensorFlow's placement",
    )
    parser.add_argument(
        "--threads",
        type=int,
        default=0,
        help="TensorFlow's intra- and inter-op threads (0: one per core); e.g. 1 "
        "on 2 cores leaves a core to the checkpoint writer",
    )
    args = parser.parse_args()
    if args.quick:
        args.reps = 1
    gpus = tf.config.list_physical_devices("GPU")
    if args.device == "gpu" and not gpus:
        print("no GPU: TensorFlow sees none here (tf.config.list_physical_devices('GPU') is empty); nothing measured")
        return
    if args.device == "cpu" and gpus:
        tf.config.set_visible_devices([], "GPU")  # before the first op initializes them
        gpus = []
    if args.threads:
        tf.config.threading.set_intra_op_parallelism_threads(args.threads)
        tf.config.threading.set_inter_op_parallelism_threads(args.threads)
    wanted = args.only.split(",")
    if gpus and args.device == "gpu":  # the first machine with a GPU gives these with one command
        wanted += [w for w in ("d2h", "lost", "lostbig") if w not in wanted]
    device = tf.config.experimental.get_device_details(gpus[0]).get("device_name", "GPU") if gpus else "CPU"
    print(
        f"{os.cpu_count()} cores, TensorFlow {tf.__version__}, running on {device}"
        + (f", {args.threads} TensorFlow threads" if args.threads else "")
    )
    out = {
        "machine": {"cpus": os.cpu_count(), "tensorflow": tf.__version__, "device": device},
        "args": vars(args),
        "targets": [],
    }
    with tempfile.TemporaryDirectory() as tmp:
        if "loop" in wanted:
            out["loop"] = bench_loop(args, tmp)
            print_table("1. loop speed, small MLP", out["loop"], "hand-written, 100 steps fused")
            out["targets"] += check_targets("loop", out["loop"])
        if "savecost" in wanted:
            out["savecost"] = bench_savecost(args, tmp)
            print_table(
                "1b. where one save of workload 1 goes", out["savecost"], "save + wait, without the data iterator"
            )
        if "savegap" in wanted:
            out["savegap"] = bench_savegap(args, tmp)
            print_table(
                "1d. a periodic save in the loop of workload 1",
                out["savegap"],
                "async saves (default)",
            )
        if "position" in wanted:
            from position import bench_position, print_position

            out["position"] = bench_position(args)
            out["targets"] += print_position(out["position"])
        if "finite" in wanted:
            out["finite"] = bench_finite(args, tmp)
            mb = 16 if args.quick else args.mb
            print_table(
                "1c. the finite-weights check before each save", out["finite"], f"{mb} MB model: bare Checkpoint.write"
            )
        if "overhead" in wanted:
            out["overhead"] = bench_overhead(args, tmp)
            print_table(
                f"2. checkpoint overhead, {16 if args.quick else args.mb} MB model", out["overhead"], "no checkpointing"
            )
            out["targets"] += check_targets("overhead", out["overhead"])
        if "io" in wanted:
            out["io"] = bench_io(args, tmp)
            print_table(
                f"3. save/restore throughput, {16 if args.quick else args.mb} MB",
                out["io"],
                "bare Checkpoint.write+fsync",
            )
            out["targets"] += check_targets("io", out["io"])
        if "resume" in wanted:
            out["resume"] = bench_resume(args, tmp)
            print_table("4. resume latency", out["resume"], "hand-written CheckpointManager restore")
            out["targets"] += check_targets("resume", out["resume"])
        if "lost" in wanted:
            out["lost"] = bench_lost(args, tmp, "mlp")
            out["targets"] += lost_targets(out["lost"])
        if "lostbig" in wanted:
            out["lostbig"] = bench_lost(args, tmp, "big")
            out["targets"] += lost_targets(out["lostbig"])
        if "growth" in wanted:
            out["growth"] = bench_growth(args, tmp)
            out["targets"] += growth_targets(out["growth"])
        if "tiers" in wanted:
            from tiers import bench_tiers, tiers_targets

            out["tiers"] = bench_tiers(args, tmp)
            out["targets"] += tiers_targets(out["tiers"])
        if "d2h" in wanted:
            if not gpus:
                print("\n  (no GPU: section 5 copies host to host here; its figures check the code, not a GPU)")
            out["d2h"] = bench_d2h(args, tmp)
            print_table(
                f"5. {'GPU' if gpus else 'CPU'}: blocking part of an async save vs the device-to-host copy",
                out["d2h"],
                "device-to-host copy",
            )
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=1)


if __name__ == "__main__":
    main()
