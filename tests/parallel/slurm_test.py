#!/usr/bin/python3
"""mxn under a real single-node Slurm (Debian's slurm-wlm and munge), started and stopped here:
munged, slurmctld and slurmd on free loopback ports in a temporary folder, then
  - `srun --mpi=pmix -n 2 mxn train --devices cpu,opencl:0` (2 CPU ranks without OpenCL): each
    rank's identity from SLURM_*, every loss within 1e-3 of the single-device run;
  - the same as 2 pipeline stages (--pp 2);
  - examples/slurm/train.sbatch through `sbatch --wait`, resuming the first job's checkpoint:
    the losses go on as the single-device run's.
usage: slurm_test.py PATH/TO/mxn PATH/TO/kjv.bin SOURCE_DIR
"""
import os, shutil, signal, socket, subprocess, sys, tempfile, time

sys.path[:0] = [os.path.dirname(os.path.abspath(__file__)),
                os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "common")]
from train_common import check, finish, losses, worst  # noqa: E402

mxn, data, src = sys.argv[1], sys.argv[2], sys.argv[3]
base = ["--data", data, "--n_layer", "2", "--n_head", "4", "--n_embd", "64", "--n_ctx", "32",
        "--steps", "30", "--eval_every", "0", "--eval_batches", "2", "--seed", "7", "--threads", "1",
        "--ckpt_every", "20", "--dtype", "f32"]
def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


for tool in ("munged", "slurmctld", "slurmd", "srun", "sbatch"):
    if not shutil.which(tool) and not os.path.exists(f"/usr/sbin/{tool}"):
        print(f"{tool} is missing: run scripts/setup (it installs slurm-wlm and munge)")
        sys.exit(1)

tmp = tempfile.mkdtemp(prefix="mxn-slurm-")
host = socket.gethostname().split(".")[0]
daemons = []
env = dict(os.environ, SLURM_CONF=f"{tmp}/slurm.conf")
try:
    with open(f"{tmp}/munge.key", "wb") as f:
        f.write(os.urandom(1024))
    os.chmod(f"{tmp}/munge.key", 0o400)
    subprocess.run(["/usr/sbin/munged", "--force", f"--key-file={tmp}/munge.key", f"--socket={tmp}/munge.sock",
                    f"--pid-file={tmp}/munged.pid", f"--log-file={tmp}/munged.log",
                    f"--seed-file={tmp}/munged.seed"], check=True, timeout=30)
    os.makedirs(f"{tmp}/state")
    os.makedirs(f"{tmp}/spool")
    with open(f"{tmp}/slurm.conf", "w") as f:
        f.write(f"""ClusterName=mxntest
SlurmctldHost={host}(127.0.0.1)
SlurmUser=root
SlurmdUser=root
SlurmctldPort={free_port()}
SlurmdPort={free_port()}
AuthType=auth/munge
AuthInfo=socket={tmp}/munge.sock
CredType=cred/munge
StateSaveLocation={tmp}/state
SlurmdSpoolDir={tmp}/spool
SlurmctldPidFile={tmp}/slurmctld.pid
SlurmdPidFile={tmp}/slurmd.pid
SlurmctldLogFile={tmp}/slurmctld.log
SlurmdLogFile={tmp}/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
MpiDefault=none
ReturnToService=2
NodeName={host} NodeAddr=127.0.0.1 CPUs={os.cpu_count()} RealMemory=1000 State=UNKNOWN
PartitionName=test Nodes={host} Default=YES MaxTime=INFINITE State=UP OverSubscribe=FORCE
""")
    subprocess.run(["/usr/sbin/slurmctld", "-f", f"{tmp}/slurm.conf"], check=True, env=env, timeout=30)
    daemons.append(f"{tmp}/slurmctld.pid")
    subprocess.run(["/usr/sbin/slurmd", "-f", f"{tmp}/slurm.conf", "-N", host], check=True, env=env, timeout=30)
    daemons.append(f"{tmp}/slurmd.pid")
    deadline = time.time() + 60
    state = ""
    while time.time() < deadline:
        state = subprocess.run(["sinfo", "-h", "-o", "%t"], env=env, stdout=subprocess.PIPE, text=True).stdout.strip()
        if state == "idle":
            break
        time.sleep(0.5)
    check("a single-node Slurm is up", state == "idle", f"sinfo says {state!r}")

    work = tempfile.mkdtemp(prefix="mxn-slurm-runs-")
    subprocess.run([mxn, "train", *base, "--out", f"{work}/one"], check=True, stdout=subprocess.PIPE, timeout=600)
    ref = losses(f"{work}/one")
    devices = "cpu,opencl:0" if "opencl:0" in subprocess.run([mxn, "devices"], stdout=subprocess.PIPE,
                                                               text=True).stdout else ""
    dev = ["--devices", devices] if devices else []
    srun = ["srun", "--mpi=pmix", "-n", "2", "--time=10"]
    r = subprocess.run([*srun, mxn, "train", *base, *dev, "--out", f"{work}/srun"], env=env,
                       stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=600)
    got = losses(f"{work}/srun") if r.returncode == 0 else []
    named = "rank 1 opencl:0" in r.stdout if devices else "plan: 2 ranks share" in r.stdout
    check(f"srun -n 2 ({devices or '2 CPU ranks'}) = one device", r.returncode == 0 and named and
          worst(ref, got) < 1e-3, f"exit {r.returncode}, worst {worst(ref, got):.2e}" +
          ("" if r.returncode == 0 else ": " + r.stdout[-400:]))
    r = subprocess.run([*srun, mxn, "train", *base, *dev, "--pp", "2", "--stages", "1,1", "--out",
                        f"{work}/pp"], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                       timeout=600)
    got = losses(f"{work}/pp") if r.returncode == 0 else []
    check("srun -n 2 as 2 pipeline stages = one device", r.returncode == 0 and "pipeline of 2 stages" in r.stdout
          and worst(ref, got) < 1e-3, f"exit {r.returncode}, worst {worst(ref, got):.2e}")

    # The documented job script, resuming the srun job's step-20 checkpoint on one rank.
    job_env = dict(env, MXN=mxn, MXN_DEVICES="cpu")
    r = subprocess.run(["sbatch", "--wait", "--ntasks", "1", "--time=10", f"--output={work}/job.out",
                        os.path.join(src, "examples/slurm/train.sbatch"), *base, "--out", f"{work}/srun",
                        "--resume", f"{work}/srun/ckpt-00000020"], env=job_env, stdout=subprocess.PIPE,
                       stderr=subprocess.STDOUT, text=True, timeout=600)
    with open(f"{work}/job.out") as f:
        job = f.read()
    got = losses(f"{work}/srun")
    check("sbatch examples/slurm/train.sbatch resumes the job", r.returncode == 0 and "resumed at step 20" in job
          and worst(ref[20:], got[20:]) < 1e-3, f"exit {r.returncode}, worst {worst(ref[20:], got[20:]):.2e}"
          + ("" if r.returncode == 0 else ": " + job[-400:]))
    shutil.rmtree(work, ignore_errors=True)
finally:
    for pid_file in reversed(daemons):
        try:
            with open(pid_file) as f:
                os.kill(int(f.read().strip()), signal.SIGTERM)
        except (OSError, ValueError):
            pass
    subprocess.run(["/usr/sbin/munged", "--stop", f"--socket={tmp}/munge.sock"], stdout=subprocess.DEVNULL,
                   stderr=subprocess.DEVNULL, timeout=30)
    time.sleep(1)
    shutil.rmtree(tmp, ignore_errors=True)

finish()
