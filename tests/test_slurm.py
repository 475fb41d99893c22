"""The real sbatch scripts (launch/slurm/) under a real Slurm: a two-node cluster on this machine
(munged, slurmctld, and one slurmd per node, both nodes at 127.0.0.1) started for these tests and
stopped afterwards by pid. Covers: train.sbatch with 2 CPU processes; multinode.sbatch across the two
nodes; and preemption: SIGUSR1 sent to the batch script the way Slurm does, checkpoint, requeue,
resume, and a TensorBoard history with every step exactly once.

Needs Debian's slurmctld, slurmd, slurm-client and munge (`make system-deps`) and root."""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from tests.helpers import (LOG_EVERY, REPO, TEST_SAMPLES, TINY, Lines, cpu_env, free_port, metrics, scalars,
                           steps_per_epoch, stop)

pytestmark = pytest.mark.slow  # a real Slurm cluster

BINARIES = ("munged", "slurmctld", "slurmd", "sbatch", "srun", "scontrol", "scancel", "squeue", "sinfo")
SEARCH_PATH = os.pathsep.join([os.environ.get("PATH", ""), "/usr/sbin", "/sbin"])  # daemons live in sbin
TRAIN = REPO / "launch/slurm/train.sbatch"
MULTINODE = REPO / "launch/slurm/multinode.sbatch"

SLURM_CONF = """\
ClusterName=dist-alexnet-test
SlurmctldHost={head}(127.0.0.1)
SlurmctldPort={ctld_port}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
AuthInfo=socket={root}/munge/socket
CredType=cred/munge
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
MpiDefault=none
ReturnToService=2
MinJobAge=3600
StateSaveLocation={root}/state
SlurmdSpoolDir={root}/spool-%n
SlurmctldPidFile={root}/run/slurmctld.pid
SlurmdPidFile={root}/run/slurmd-%n.pid
SlurmctldLogFile={root}/log/slurmctld.log
SlurmdLogFile={root}/log/slurmd-%n.log
PlugStackConfig={root}/plugstack.conf
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
JobCompType=jobcomp/none
{nodes}
PartitionName=test Nodes=ALL Default=YES MaxTime=INFINITE State=UP
"""


def sbin(name: str) -> str:
    return shutil.which(name, path=SEARCH_PATH)


class Cluster:
    """A Slurm cluster on this machine: slurmctld under this host's short name, and two nodes, that
    name and `localhost`, both at 127.0.0.1 with a slurmd each (on its own port), so that a two-node
    job really runs two `srun` tasks with SLURM_NODEID 0 and 1. Every daemon runs in the foreground as
    our child, so stopping it by pid also reaps it."""

    def __init__(self, root: Path):
        self.root = root
        self.nodes = [socket.gethostname().split(".")[0], "localhost"]
        self.conf = root / "slurm.conf"
        self.env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "SBATCH_", "SRUN_"))}
        self.env["SLURM_CONF"] = str(self.conf)
        self.daemons: list[subprocess.Popen] = []

    def start(self) -> None:
        for sub in ("munge", "state", "run", "log"):
            (self.root / sub).mkdir(mode=0o700)
        key = self.root / "munge/munge.key"
        key.write_bytes(os.urandom(1024))
        key.chmod(0o600)
        munge = self.root / "munge"
        self._daemon([sbin("munged"), "--foreground", "--force", f"--socket={munge}/socket",
                      f"--key-file={key}", f"--pid-file={munge}/munged.pid", f"--log-file={munge}/munged.log",
                      f"--seed-file={munge}/munged.seed"])
        self._wait(lambda: (munge / "socket").exists(), 20, "munged did not create its socket")

        nodes = "\n".join(f"NodeName={name} NodeAddr=127.0.0.1 Port={free_port()} CPUs={os.cpu_count()}"
                          for name in self.nodes)
        self.conf.write_text(SLURM_CONF.format(root=self.root, head=self.nodes[0], ctld_port=free_port(),
                                               nodes=nodes))
        (self.root / "plugstack.conf").write_text("")  # none of the system's SPANK plugins
        self._daemon([sbin("slurmctld"), "-D", "-f", str(self.conf)])
        for name in self.nodes:
            self._daemon([sbin("slurmd"), "-D", "-f", str(self.conf), "-N", name])
        self._wait(lambda: self.slurm("sinfo", "-h", "-N", "-o", "%t", check=False).split() == ["idle"] * 2,
                   60, "the nodes did not become idle")

    def _daemon(self, cmd: list[str]) -> None:
        log = open(self.root / "log" / f"{Path(cmd[0]).name}-{len(self.daemons)}.out", "w")
        self.daemons.append(subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=self.env))
        log.close()

    def _wait(self, condition, timeout: float, message: str) -> None:
        deadline = time.monotonic() + timeout
        while not condition():
            dead = [Path(p.args[0]).name for p in self.daemons if p.poll() is not None]
            if dead or time.monotonic() > deadline:
                exited = f" (exited: {', '.join(dead)})" if dead else ""
                raise RuntimeError(f"{message}{exited}\n{self.logs()}")
            time.sleep(0.2)

    def logs(self) -> str:
        return "\n".join(f"--- {f.name}\n" + f.read_text()[-3000:] for f in sorted((self.root / "log").iterdir()))

    def stop(self) -> None:
        """Cancel what is left, then stop the daemons by pid: slurmd, slurmctld, munged (reverse start order)."""
        if self.daemons:
            jobs = self.slurm("squeue", "-h", "-o", "%i", check=False).split()
            if jobs:
                self.slurm("scancel", *jobs, check=False)
                deadline = time.monotonic() + 60
                while self.slurm("squeue", "-h", "-o", "%i", check=False).split() and time.monotonic() < deadline:
                    time.sleep(0.5)
        for daemon in reversed(self.daemons):
            stop(daemon, timeout=20)

    # --- client commands

    def slurm(self, *cmd: str, check: bool = True) -> str:
        result = subprocess.run(cmd, capture_output=True, text=True, env=self.env, timeout=60)
        if check and result.returncode != 0:
            raise AssertionError(f"{' '.join(cmd)}: exit {result.returncode}: {result.stderr}")
        return result.stdout

    def sbatch(self, script: Path, args: list[str], cwd: Path, sbatch_options=(), **env) -> str:
        """Submit like a user from `cwd` (the submit directory); returns the job id."""
        job_env = cpu_env(**env)
        job_env = {k: v for k, v in job_env.items() if not k.startswith(("SLURM_", "SBATCH_", "SRUN_"))}
        job_env.update(SLURM_CONF=str(self.conf), DIST_ALEXNET_HOME=str(REPO), DIST_ALEXNET_VENV=sys.prefix,
                       CUDA_VISIBLE_DEVICES="")  # the nodes-without-GPUs path, whatever this machine has
        result = subprocess.run(["sbatch", "--parsable", *sbatch_options, str(script), *args], capture_output=True,
                                text=True, env=job_env, cwd=cwd, timeout=60, check=True)
        return result.stdout.strip().split(";")[0]

    def job(self, job_id: str) -> dict[str, str]:
        """The job's fields from `scontrol show job` (the ones without spaces in their values)."""
        text = self.slurm("scontrol", "show", "job", "-o", job_id)
        return dict(re.findall(r"(\w+)=(\S*)", text))

    def wait_for(self, job_id: str, condition, timeout: float, log: Path | None = None) -> dict[str, str]:
        deadline = time.monotonic() + timeout
        while True:
            job = self.job(job_id)
            if condition(job):
                return job
            if time.monotonic() > deadline:
                tail = log.read_text()[-4000:] if log and log.exists() else "(no Slurm output file)"
                raise AssertionError(f"job {job_id} timed out in state {job['JobState']}\n{tail}\n{self.logs()}")
            time.sleep(0.25)

    def wait_until_finished(self, job_id: str, log: Path, timeout: float = 240) -> dict[str, str]:
        job = self.wait_for(job_id, lambda j: j["JobState"] not in ("PENDING", "RUNNING", "CONFIGURING",
                                                                      "COMPLETING", "REQUEUED"), timeout, log)
        assert job["JobState"] == "COMPLETED", f"job {job_id}: {job['JobState']}\n{log.read_text()[-4000:]}"
        return job


@pytest.fixture(scope="module")
def slurm(tmp_path_factory):
    missing = [b for b in BINARIES if not sbin(b)]
    if missing:
        pytest.skip(f"REAL-SLURM TESTS SKIPPED: {', '.join(missing)} not found (PATH, /usr/sbin, /sbin); "
                    f"install Debian's slurmctld slurmd slurm-client munge (`make system-deps` as root)")
    if os.geteuid() != 0:
        pytest.skip("REAL-SLURM TESTS SKIPPED: the local test cluster runs its daemons and jobs as root")
    cluster = Cluster(tmp_path_factory.mktemp("slurm"))
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.stop()


def tiny(data_dir: Path, *extra: str) -> list[str]:
    return [*TINY, "--data-dir", str(data_dir), *extra]


def test_train_sbatch_runs_two_cpu_processes(slurm, tmp_path, data_dir):
    job = slurm.sbatch(TRAIN, tiny(data_dir, "--epochs", "1", "--lr", "5e-4"), cwd=tmp_path, NPROC_PER_NODE=2)
    log = tmp_path / f"slurm-{job}.out"
    slurm.wait_until_finished(job, log)

    run_dir = tmp_path / "runs" / f"slurm-{job}"  # the default run directory, in the submit directory
    m = metrics(run_dir)
    assert m["world_size"] == 2 and m["distributed_type"] == "MULTI_CPU"
    assert m["steps"] == steps_per_epoch(2) and m["test_samples"] == TEST_SAMPLES
    assert yaml.safe_load((run_dir / "config.yaml").read_text())["lr"] == 5e-4  # options passed through
    text = log.read_text()
    assert f"run directory runs/slurm-{job} | 2 process(es), MULTI_CPU" in text
    assert "test accuracy" in text


def test_multinode_sbatch_forms_one_job_across_two_nodes(slurm, tmp_path, data_dir):
    for name in slurm.nodes:  # the script gives the head node's name as rank 0's address
        try:
            socket.gethostbyname(name)
        except OSError:
            pytest.fail(f"node name {name} does not resolve on this machine: add it to /etc/hosts")
    job = slurm.sbatch(MULTINODE, tiny(data_dir, "--max-steps", "3"), cwd=tmp_path, NPROC_PER_NODE=1)
    log = tmp_path / f"slurm-{job}.out"
    info = slurm.wait_until_finished(job, log)

    nodes = slurm.slurm("scontrol", "show", "hostnames", info["NodeList"]).split()
    assert sorted(nodes) == sorted(slurm.nodes)
    text = log.read_text()
    # each node read its own rank; both met at the first node of the allocation on one port
    lines = re.findall(r"^node (\S+): machine rank (\d) of 2, 1 process\(es\) on 0 GPU\(s\), head ([^\s,]+),",
                       text, re.MULTILINE)
    assert sorted((rank, node) for node, rank, _ in lines) == [("0", nodes[0]), ("1", nodes[1])], text
    heads = {head for _, _, head in lines}
    assert len(heads) == 1 and heads.pop().startswith(f"{nodes[0]}:")
    m = metrics(tmp_path / "runs" / f"slurm-{job}")
    assert m["world_size"] == 2 and m["steps"] == 3 and m["test_samples"] == TEST_SAMPLES
    assert m["param_checksums"][0] == m["param_checksums"][1]


def test_preempted_job_saves_requeues_itself_and_resumes(slurm, tmp_path, data_dir):
    epochs, per_epoch = 6, steps_per_epoch(2)
    total = epochs * per_epoch
    # An array task (its id is <array job>_<task>), the case most easily got wrong: the run directory,
    # the log file and the job that rank 0 requeues must all be the task's.
    array_job = slurm.sbatch(TRAIN, tiny(data_dir, "--epochs", str(epochs)), cwd=tmp_path,
                             sbatch_options=["--array=3"], NPROC_PER_NODE=2)
    job = f"{array_job}_3"
    log, run_dir = tmp_path / f"slurm-{job}.out", tmp_path / "runs" / f"slurm-{job}"

    # Signal only a job that is RUNNING and training (a signal to a pending job is lost), as Slurm
    # does for `--signal=B:USR1@120`: to the batch script alone, which must pass it on.
    Lines(log).wait_for(rf"^epoch 1 step 8/{total} ", timeout=120)
    assert slurm.job(job)["JobState"] == "RUNNING"
    slurm.slurm("scancel", "--signal=USR1", "--batch", job)

    # Rank 0 requeued the job: pending, restart 1, held until its BeginTime (120 s) unless released.
    requeued = slurm.wait_for(job, lambda j: j["Restarts"] == "1" and j["JobState"] == "PENDING", 120, log)
    assert requeued["Reason"] == "BeginTime"
    slurm.slurm("scontrol", "update", f"JobId={job}", "StartTime=now")
    slurm.wait_until_finished(job, log)

    text = log.read_text()
    assert "got SIGUSR1: forwarding it to the training processes" in text
    preempted = re.findall(r"^preempted at step (\d+) by SIGUSR1", text, re.MULTILINE)
    resumed = re.findall(r"^resumed from (\S+) at step (\d+)", text, re.MULTILINE)
    assert len(preempted) == 1 and len(resumed) == 1, text
    step = int(preempted[0])
    assert 8 <= step < total  # stopped while training, not at the end
    assert resumed[0][0].endswith(f"slurm-{job}/checkpoints/step_{step:06d}") and resumed[0][1] == str(step)
    assert f"requeued Slurm job {job}" in text  # the array task, not the whole array
    assert f"job {job} (restart 1)" in text  # the same log file, appended to, and the same run directory

    m = metrics(run_dir)
    assert m["steps"] == total and m["world_size"] == 2 and m["test_samples"] == TEST_SAMPLES
    # every logged step exactly once across the two runs: nothing lost, nothing repeated
    assert [s for s, _ in scalars(run_dir, "train/loss")] == list(range(LOG_EVERY, total + 1, LOG_EVERY))
    print(f"preempted at step {step}, resumed from step {resumed[0][1]}")


def test_preemption_after_the_last_allowed_restart_saves_but_does_not_requeue(slurm, tmp_path, data_dir):
    epochs = 10
    total = epochs * steps_per_epoch(2)
    job = slurm.sbatch(TRAIN, tiny(data_dir, "--epochs", str(epochs)), cwd=tmp_path, NPROC_PER_NODE=2,
                       MAX_RESTARTS=0)
    log = tmp_path / f"slurm-{job}.out"
    Lines(log).wait_for(rf"^epoch 1 step 8/{total} ", timeout=120)
    slurm.slurm("scancel", "--signal=USR1", "--batch", job)
    info = slurm.wait_until_finished(job, log)

    assert info["Restarts"] == "0"
    text = log.read_text()
    assert "restart 0: MAX_RESTARTS=0 reached, a preemption now saves a checkpoint and stops" in text
    step = int(re.search(r"^preempted at step (\d+)", text, re.MULTILINE).group(1))
    assert (tmp_path / "runs" / f"slurm-{job}" / "checkpoints" / f"step_{step:06d}").is_dir()
    assert "requeued Slurm job" not in text


def job_workers(job: str, node: int) -> list[int]:
    """The training processes (not the launchers) of a job on node `node` (SLURM_NODEID), from /proc."""
    found = []
    for proc in Path("/proc").iterdir():
        try:
            env = dict(item.split("=", 1) for item in (proc / "environ").read_text().split("\0") if "=" in item)
        except (OSError, UnicodeDecodeError):
            continue
        if env.get("SLURM_JOB_ID") == job and env.get("SLURM_NODEID") == str(node) and "LOCAL_RANK" in env:
            found.append(int(proc.name))
    return found


def test_killed_workers_restart_both_nodes_and_the_job_finishes(slurm, tmp_path, data_dir):
    """kill -9 the worker on node 1, then, once the job has resumed, the one on node 0 (rank 0)."""
    job = slurm.sbatch(MULTINODE, tiny(data_dir, "--epochs", "2", "--log-every", "1", "--checkpoint-every", "5"),
                       cwd=tmp_path, NPROC_PER_NODE=1, WORKER_RESTARTS=2)
    log, run_dir = tmp_path / f"slurm-{job}.out", tmp_path / "runs" / f"slurm-{job}"
    # each kill comes after a committed checkpoint (steps 5, 20): the save of a step ends before the next
    # step's line (a kill on seeing step 20's own line can land during its save; resuming from 16 is then right)
    output = Lines(log)
    for node, after in ((1, r"^epoch 1 step 6/32 "), (0, r"^epoch 2 step 2[1-4]/32 ")):
        output.wait_for(after, timeout=120)
        workers = job_workers(job, node=node)
        assert len(workers) == 1, workers
        os.kill(workers[0], signal.SIGKILL)
    slurm.wait_until_finished(job, log)
    text = log.read_text()
    resumed = [int(step) for step in re.findall(r"^resumed from \S+/step_(\d+) at step", text, re.MULTILINE)]
    assert len(resumed) == 2 and resumed[0] in (5, 10) and resumed[1] >= 20, text[-4000:]
    m = metrics(run_dir)
    assert m["steps"] == 32 and m["world_size"] == 2 and m["param_checksums"][0] == m["param_checksums"][1]
    assert [s for s, _ in scalars(run_dir, "train/loss")] == list(range(1, 33))  # every step exactly once
