"""Autoscaling on one machine: Ray's fake multi-node provider adds GPU-typed worker nodes when the
job's detector actors ask for GPUs, and removes them once idle.

    python benchmarks/autoscale_demo.py            # ~2-3 minutes on 2 cores
    → benchmarks/results/autoscale_demo.json and .md (node count over time, job summary)

The head has no GPU. The worker type ``gpu_worker`` declares ``{CPU: 1, GPU: 1}`` (the GPU is a
fake resource: the detector runs ONNX Runtime on the CPU with ``device=cpu``), min 0, max 2.
The job asks for ``num_gpus=1`` per detector actor with an autoscaling actor pool
``ActorPoolStrategy(min_size=1, max_size=2)``; the autoscaler launches worker nodes for the
pending actors and terminates them ``idle_timeout_minutes`` after the job has finished.

The cluster runs in its own session and temp dir and is stopped by signalling that session's
processes (never with `ray stop`, which would stop every Ray instance on the machine).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import socket
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
DATA = Path(os.environ.get("RAYDETECT_TEST_DATA", REPO.parent / "shared" / "data"))
RESULTS = REPO / "benchmarks" / "results"
MB = 2**20


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def fake_cluster_config(gcs_address: str, max_gpu_workers: int, idle_minutes: float) -> dict:
    return {
        "cluster_name": "raydetect-fake",
        "max_workers": max_gpu_workers,
        "upscaling_speed": 1.0,
        "idle_timeout_minutes": idle_minutes,
        "provider": {
            "type": "fake_multinode",
            # these three must sit under provider: (at the top level they are ignored)
            "use_node_id_as_ip": True,
            "disable_node_updaters": True,
            "disable_launch_config_check": True,
            "gcs_address": gcs_address,
        },
        "auth": {"ssh_user": "ubuntu"},
        "available_node_types": {
            "ray.head.default": {"resources": {"CPU": 1}, "node_config": {}, "max_workers": 0},
            "gpu_worker": {
                "resources": {"CPU": 1, "GPU": 1, "object_store_memory": 150 * MB},
                "node_config": {},
                "min_workers": 0,
                "max_workers": max_gpu_workers,
            },
        },
        "head_node_type": "ray.head.default",
        "file_mounts": {},
        "cluster_synced_files": [],
        "file_mounts_sync_continuously": False,
        "rsync_exclude": [],
        "rsync_filter": [],
        "initialization_commands": [],
        "setup_commands": [],
        "head_setup_commands": [],
        "worker_setup_commands": [],
        "head_start_ray_commands": [],
        "worker_start_ray_commands": [],
    }


class NodeWatcher(threading.Thread):
    """Samples the cluster every ``period_s``: alive nodes, GPU nodes, GPUs in use."""

    def __init__(self, t0: float, period_s: float = 1.0) -> None:
        super().__init__(daemon=True)
        self.t0, self.period_s = t0, period_s
        self.samples: list[dict] = []
        self.phase = "start"
        self._halt = threading.Event()

    def sample(self) -> dict:
        import ray

        nodes = [n for n in ray.nodes() if n["Alive"]]
        gpu_nodes = [n for n in nodes if n["Resources"].get("GPU", 0) > 0]
        total = ray.cluster_resources().get("GPU", 0.0)
        free = ray.available_resources().get("GPU", 0.0)
        return {
            "t": round(time.time() - self.t0, 1),
            "phase": self.phase,
            "nodes": len(nodes),
            "gpu_nodes": len(gpu_nodes),
            "gpus_in_use": round(total - free, 2),
        }

    def run(self) -> None:
        while not self._halt.is_set():
            try:
                self.samples.append(self.sample())
            except Exception as e:  # a sample may fail while a node is leaving
                self.samples.append({"t": round(time.time() - self.t0, 1), "phase": self.phase, "error": str(e)})
            self._halt.wait(self.period_s)

    def stop(self) -> None:
        self._halt.set()
        self.join(timeout=10)


def changes(samples: list[dict]) -> list[dict]:
    """Only the samples where the GPU-node count changed (plus the first)."""
    out, last = [], None
    for s in samples:
        if "gpu_nodes" in s and s["gpu_nodes"] != last:
            out.append(s)
            last = s["gpu_nodes"]
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=int, default=100, help="images in the job (copies of the sample photos)")
    ap.add_argument("--max-gpu-workers", type=int, default=2)
    ap.add_argument("--idle-minutes", type=float, default=0.25, help="autoscaler idle timeout")
    ap.add_argument("--wait-down-s", type=float, default=180, help="max wait for the nodes to be removed")
    ap.add_argument("--out", default=str(RESULTS / "autoscale_demo"), help="result path without extension")
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")

    work = Path(tempfile.mkdtemp(prefix="rdauto", dir="/tmp"))
    src = work / "in"
    src.mkdir()
    photos = sorted(p for p in (DATA / "images").iterdir() if p.suffix.lower() in (".jpg", ".webp"))
    for i in range(args.images):
        p = photos[i % len(photos)]
        shutil.copy(p, src / f"{i:04d}-{p.name}")

    os.environ["RAY_AUTH_MODE"] = "token"  # before importing ray: it reads the mode once
    import ray

    from tests.local_cluster import start_head, stop_session

    port = free_port()
    node_ip = ray._private.services.get_node_ip_address()
    cfg_path = work / "fake.yaml"
    cfg_path.write_text(json.dumps(fake_cluster_config(f"{node_ip}:{port}", args.max_gpu_workers, args.idle_minutes)))
    env = {**os.environ, "RAY_FAKE_CLUSTER": "1", "AUTOSCALER_UPDATE_INTERVAL_S": "1"}
    cmd = [f"--port={port}", "--num-cpus=1", "--num-gpus=0",
           f"--object-store-memory={300 * MB}", f"--autoscaling-config={cfg_path}", f"--temp-dir={work / 'ray'}",
           "--include-dashboard=false", "--disable-usage-stats"]
    head = start_head(cmd, env=env, log=work / "head.log")
    t0 = time.time()
    watcher = None
    result: dict = {"command": "python benchmarks/autoscale_demo.py " + " ".join(sys.argv[1:]),
                    "cluster_config": {"head": {"CPU": 1, "GPU": 0},
                                       "gpu_worker": {"CPU": 1, "GPU": 1, "min": 0, "max": args.max_gpu_workers},
                                       "idle_timeout_minutes": args.idle_minutes}}
    try:
        deadline = time.time() + 180
        while True:
            try:
                ray.init(address=f"{node_ip}:{port}", logging_level=logging.WARNING)
                break
            except Exception:
                if head.poll() is not None or time.time() > deadline:
                    raise RuntimeError(f"the fake cluster did not start:\n{(work / 'head.log').read_text()[-3000:]}") from None
                time.sleep(2)
        watcher = NodeWatcher(t0)
        watcher.start()
        time.sleep(3)

        from raydetect.config import DetectorConfig, JobConfig
        from raydetect.job.run import run_job

        job = JobConfig(
            input=str(src), output=str(work / "out"), num_gpus=1.0, num_cpus=1.0, concurrency=2, min_actors=1,
            shard_size=10, progress=False, report=False,
            detector=DetectorConfig(model=str(DATA / "models" / "yolov8n-random.onnx"), engine="onnxruntime",
                                    device="cpu", threads=1, batch_size=4, conf=0.25),
        )
        watcher.phase = "job"
        t_job = time.time() - t0
        summary = run_job(job)
        t_done = time.time() - t0
        watcher.phase = "idle"
        logging.info("%s", summary.line())
        deadline = time.time() + args.wait_down_s
        while time.time() < deadline:
            time.sleep(2)
            s = watcher.samples[-1] if watcher.samples else {}
            if s.get("gpu_nodes") == 0 and time.time() - t0 > t_done + 5:
                break
        time.sleep(2)
        watcher.stop()
        samples = watcher.samples
        gpu_counts = [s["gpu_nodes"] for s in samples if "gpu_nodes" in s]
        added = next((s["t"] for s in samples if s.get("gpu_nodes", 0) > 0), None)
        peak = max(gpu_counts) if gpu_counts else 0
        removed = None
        if peak and gpu_counts[-1] == 0:
            last_pos = max(i for i, s in enumerate(samples) if s.get("gpu_nodes", 0) > 0)
            removed = next((s["t"] for s in samples[last_pos + 1 :] if s.get("gpu_nodes") == 0), None)
        result.update(
            job={"started_at_s": round(t_job, 1), "finished_at_s": round(t_done, 1), "images": summary.images,
                 "seconds": round(summary.seconds, 1), "images_per_s": round(summary.images_per_s, 2),
                 "detections": summary.detections, "errors": summary.errors, "summary": summary.line()},
            first_gpu_node_at_s=added, peak_gpu_nodes=peak, all_gpu_nodes_removed_at_s=removed,
            peak_gpus_in_use=max((s["gpus_in_use"] for s in samples if "gpus_in_use" in s), default=0),
            nodes_added=peak > 0, nodes_removed=removed is not None,
            changes=changes(samples), samples=samples,
        )
    finally:
        try:
            if watcher is not None and watcher.is_alive():
                watcher.stop()
            ray.shutdown()
        finally:
            stop_session(head.pid)
            head.wait(timeout=60)
        shutil.rmtree(work, ignore_errors=True)

    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(result, indent=2) + "\n")
    lines = [
        "# Autoscaling demo (Ray fake multi-node provider, one machine)",
        "",
        f"Command: `{result['command']}`",
        "",
        f"Head: CPU 1, GPU 0. Worker type `gpu_worker`: CPU 1, GPU 1 (fake), min 0, max {args.max_gpu_workers}; "
        f"idle timeout {args.idle_minutes} min. Job: {args.images} images, detector actors with num_gpus=1, "
        "ActorPoolStrategy(min_size=1, max_size=2), ONNX Runtime on the CPU.",
        "",
        f"- job started at {result['job']['started_at_s']} s, finished at {result['job']['finished_at_s']} s: "
        f"{result['job']['summary']}",
        f"- first GPU node up at {result['first_gpu_node_at_s']} s; peak {result['peak_gpu_nodes']} GPU nodes, "
        f"at most {result['peak_gpus_in_use']} GPUs held by detector actors at once",
        f"- all GPU nodes removed at {result['all_gpu_nodes_removed_at_s']} s",
        "",
        "| t (s) | phase | nodes | GPU nodes | GPUs in use |",
        "|---:|---|---:|---:|---:|",
    ]
    lines += [f"| {s['t']} | {s['phase']} | {s['nodes']} | {s['gpu_nodes']} | {s['gpus_in_use']} |"
              for s in result["changes"]]
    lines += ["", "Rows are the samples where the GPU-node count changed; all samples (1 s apart) are in the JSON."]
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0 if result["nodes_added"] and result["nodes_removed"] else 1


if __name__ == "__main__":
    sys.exit(main())
