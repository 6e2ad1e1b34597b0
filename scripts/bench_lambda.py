#!/usr/bin/env python3
"""Measures the companion Lambda under the local Runtime API against moto on loopback.

For each of RUNS cold starts: start `bootstrap` under tests/emulators/lambda_runtime.py, read its
init time (spawn to first /next), send one lifecycle event (cold handler: document check,
ListCommands, SendCommand) and WARM more (document check cached). Prints medians.
Usage: bench_lambda.py BOOTSTRAP RUNS WARM
"""
import json
import os
import socket
import statistics
import subprocess
import sys
import time
import urllib.request
import uuid

import boto3

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PY = os.path.join(ROOT, ".venv/bin/python")


def free_port():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


def wait_port(port):
    for _ in range(3000):
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.1).close()
            return
        except OSError:
            time.sleep(0.01)
    raise SystemExit(f"nothing listening on {port}")


def http(method, url, body=None):
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(url, data=data, method=method)
    with urllib.request.urlopen(req, timeout=60) as r:
        return json.loads(r.read() or b"null")


def main():
    bootstrap, runs, warm = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    port, control = free_port(), free_port()
    env = dict(os.environ, AWS_ACCESS_KEY_ID="bench", AWS_SECRET_ACCESS_KEY="bench",
               AWS_REGION="us-east-1", AWS_ENDPOINT_URL=f"http://127.0.0.1:{port}")
    moto = subprocess.Popen(
        [PY, os.path.join(ROOT, "tests/emulators/moto_lifecycle.py"), "--port", str(port),
         "--control-port", str(control)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
    procs = [moto]
    try:
        wait_port(port)
        wait_port(control)
        ssm = boto3.client("ssm", endpoint_url=env["AWS_ENDPOINT_URL"], region_name="us-east-1",
                           aws_access_key_id="bench", aws_secret_access_key="bench")
        with open(os.path.join(ROOT, "ssm-documents/lifeboat-backup.json")) as f:
            ssm.create_document(Name="lifeboat-backup", Content=f.read(),
                                DocumentType="Command", DocumentFormat="JSON")
        instance = "i-0123456789abcdef0"
        # A managed instance whose commands end at once (no lifeboat on its PATH).
        http("POST", f"http://127.0.0.1:{control}/ssm/agents",
             {"instance_id": instance, "path": "/nonexistent"})
        inits, colds, warms = [], [], []
        for _ in range(runs):
            rport = free_port()
            rt = subprocess.Popen(
                [PY, os.path.join(ROOT, "tests/emulators/lambda_runtime.py"), "--port", str(rport),
                 "--", bootstrap],
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
            procs.append(rt)
            wait_port(rport)
            base = f"http://127.0.0.1:{rport}"
            for _ in range(3000):
                init = http("GET", f"{base}/init")["init_ms"]
                if init is not None:
                    break
                time.sleep(0.005)
            inits.append(init)
            for i in range(warm + 1):
                event = {
                    "version": "0", "id": str(uuid.uuid4()), "source": "aws.autoscaling",
                    "detail-type": "EC2 Instance-terminate Lifecycle Action",
                    "region": "us-east-1", "resources": [],
                    "detail": {
                        "LifecycleActionToken": str(uuid.uuid4()),
                        "AutoScalingGroupName": "bench", "LifecycleHookName": "lifeboat",
                        "EC2InstanceId": instance,
                        "LifecycleTransition": "autoscaling:EC2_INSTANCE_TERMINATING",
                    },
                }
                out = http("POST", f"{base}/invoke", event)
                assert out["ok"] and out["result"]["outcome"] == "sent", out
                (colds if i == 0 else warms).append(out["duration_ms"])
            rt.terminate()
            rt.wait()
        zip_path = os.path.join(os.path.dirname(bootstrap), "bootstrap.zip")
        print(f"companion Lambda on loopback (moto + local Runtime API), {runs} cold starts, "
              f"{warm} warm events each:")
        if os.path.exists(zip_path):
            print(f"  bootstrap.zip      {os.path.getsize(zip_path) / 1e6:.2f} MB      target < 5 MB")
        print(f"  init (cold start)  median {statistics.median(inits):.1f} ms   "
              f"(min {min(inits):.1f}, max {max(inits):.1f})   target < 50 ms")
        print(f"  first event        median {statistics.median(colds):.1f} ms   "
              f"(DescribeDocument + ListCommands + SendCommand)   target < 200 ms")
        print(f"  warm event         median {statistics.median(warms):.1f} ms   "
              f"(ListCommands + SendCommand; p90 {statistics.quantiles(warms, n=10)[-1]:.1f} ms)")
    finally:
        for p in procs:
            p.terminate()
        for p in procs:
            p.wait()


if __name__ == "__main__":
    main()
