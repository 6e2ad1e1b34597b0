#!/usr/bin/env python3
"""A fleet scale-in on loopback: N instances terminated at once, on either of lifeboat's paths.

    fleet_sim.py --lifeboat PATH --workdir DIR [--n 1000] [--as-rate 20] [...]
    fleet_sim.py --path run-command --bootstrap PATH --lifeboat PATH --workdir DIR [...]

One Auto Scaling group of N instances with a terminate hook in the moto extension
(tests/emulators/moto_lifecycle.py), one IMDS emulator answering for every instance at its own
loopback address (tests/emulators/imds.py --fleet), a small data set per instance, then one
SetDesiredCapacity to 0. On the daemon path (default) every instance runs `lifeboat run`. On the
Run Command path, moto plays EventBridge: each lifecycle event goes, as the template sends it,
to the lifecycle queue in front of the companion Lambda (tests/emulators/lambda_runtime.py's
SQS queue and event source mapping: batches of up to 50 gathered for 5 s, visibility timeout
180 s, 3 receives; --lambda-source direct invokes the Lambda with each event instead, failed
events retried after --lambda-retry-delays) under the local Runtime API, --lambda-concurrency
copies at once; the Lambda sends the project's document (one command per batch of instances);
the SSM agent stand-in (tests/emulators/ssm_agent.py) runs it on each instance (`lifeboat backup
--complete-lifecycle`) and posts the failures back, as the template's rule does. The APIs are
token buckets (moto_lifecycle.py's fleet limits). Default rates, all flags:

- Auto Scaling: 20 requests/s, burst 40, one bucket for every call of the account and region.
  AWS publishes no rate for the Auto Scaling API ("Rate exceeded" is all it says); EC2's published
  request-token buckets for comparable mutating actions refill at 5-20/s with bursts of 50-100
  (EC2 API reference, "Request throttling"), and users of lifecycle-hook tools report Throttling
  from a few hundred instances heartbeating in step, so 20/s is a fair guess, not a fact.
- SSM SendCommand 5/s and ListCommands 10/s: no published rate either; peers' reports of
  ThrottlingException under bursts of SendCommand point to single digits per second.
- SNS Publish 300/s: the documented default for Publish in us-east-1 is 30,000/s; 300/s is a
  conservative stand-in that the fleet never reaches.
- S3: 3,500 PUT/s per prefix (S3 User Guide, "Best practices design patterns: optimizing Amazon
  S3 performance"), 503 SlowDown above it.

It prints a report (and writes it as JSON to DIR/report.json; on the Run Command path each
instance's command, with its output, to DIR/commands.json): archives present / N, actions by
outcome (completed, or timed out: the hook's default result), completions without an archive,
time to the last completion and to the last archive, the floors the Auto Scaling and SendCommand
buckets set, API calls and throttles per termination by operation, Lambda invocations by outcome
and Lambda's retries, Run Command results, the bench's peak memory.
"""

import argparse
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
PY = os.path.join(ROOT, ".venv", "bin", "python")
REGION = "us-east-1"
KEYS = {"AWS_ACCESS_KEY_ID": "fleet", "AWS_SECRET_ACCESS_KEY": "fleet-secret"}


def free_port():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


def wait_port(port, what, host="127.0.0.1", limit=60):
    end = time.time() + limit
    while time.time() < end:
        try:
            socket.create_connection((host, port), timeout=1).close()
            return
        except OSError:
            time.sleep(0.05)
    sys.exit(f"fleet-sim: {what} did not start")


def get_json(url):
    with urllib.request.urlopen(url, timeout=30) as r:
        return json.load(r)


def mem_used_mib():
    info = {}
    with open("/proc/meminfo") as f:
        for line in f:
            k, v = line.split(":")
            info[k] = int(v.split()[0])
    return (info["MemTotal"] - info["MemAvailable"]) / 1024


def post_json(url, body):
    req = urllib.request.Request(url, data=json.dumps(body).encode(), method="POST",
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=30) as r:
        return r.read()


def start_lambda(a, work, procs, endpoint, control, group, topic, ssm):
    """The Run Command path: the project's document in SSM, the companion Lambda under the local
    Runtime API with its reserved concurrency, and EventBridge (moto) posting the group's
    lifecycle events and the commands' status changes to it. Returns the events URL."""
    if not a.bootstrap:
        sys.exit("fleet-sim: --path run-command needs --bootstrap (the Lambda's binary)")
    with open(os.path.join(ROOT, "ssm-documents/lifeboat-backup.json")) as f:
        ssm.create_document(Name="lifeboat-backup", Content=f.read(), DocumentType="Command",
                            DocumentFormat="JSON")
    port = free_port()
    env = [f"AWS_ENDPOINT_URL={endpoint}", f"AWS_REGION={REGION}",
           *(f"{k}={v}" for k, v in KEYS.items()),
           "LIFEBOAT_DOCUMENT=lifeboat-backup", f"LIFEBOAT_SNS_TOPIC_ARN={topic}",
           f"LIFEBOAT_ON_FAILURE={a.on_failure}",
           f"LIFEBOAT_HEARTBEAT_TIMEOUT={a.heartbeat_timeout}"]
    procs.append(subprocess.Popen(
        [PY, os.path.join(ROOT, "tests/emulators/lambda_runtime.py"), "--port", str(port),
         "--timeout", str(a.lambda_timeout), "--concurrency", str(a.lambda_concurrency),
         "--retry-delays", a.lambda_retry_delays, "--batch-size", "50",
         "--batch-window", str(a.batch_window), "--visibility-timeout", str(a.visibility_timeout),
         "--max-receive", "3", "--", "env", *env, a.bootstrap],
        stdout=open(os.path.join(work, "lambda.log"), "w"), stderr=subprocess.STDOUT))
    wait_port(port, "the Lambda runtime emulator")
    url = f"http://127.0.0.1:{port}/events"
    lifecycle_url = url if a.lambda_source == "direct" else f"http://127.0.0.1:{port}/queue"
    post_json(control + "/events", {"group": group, "url": lifecycle_url})
    return url


def address(k):
    """The loopback address of instance k (127.1.0.1, 127.1.0.2, ...)."""
    return f"127.1.{k // 250}.{k % 250 + 1}"


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--lifeboat", required=True)
    p.add_argument("--path", choices=("daemons", "run-command"), default="daemons",
                   help="daemons: `lifeboat run` on every instance; run-command: the companion "
                        "Lambda sends the SSM document, the agent stand-in runs it")
    p.add_argument("--bootstrap", help="the Lambda's bootstrap (run-command)")
    p.add_argument("--lambda-concurrency", type=int, default=20,
                   help="the Lambda's reserved concurrency (the template's default)")
    p.add_argument("--lambda-timeout", type=int, default=30,
                   help="the Lambda's timeout in seconds (the template's)")
    p.add_argument("--lambda-retry-delays", default="60,120",
                   help="seconds before Lambda's 2nd and 3rd attempt of a failed event "
                        "(Lambda's asynchronous invocation: about 1 and 2 minutes)")
    p.add_argument("--lambda-source", choices=("queue", "direct"), default="queue",
                   help="lifecycle events through the SQS queue in batches (the template), or "
                        "one asynchronous invocation each")
    p.add_argument("--batch-window", type=float, default=5,
                   help="the event source mapping's batching window (the template's)")
    p.add_argument("--visibility-timeout", type=float, default=180,
                   help="the lifecycle queue's visibility timeout (the template's)")
    p.add_argument("--on-failure", default="CONTINUE", help="LIFEBOAT_ON_FAILURE (template default)")
    p.add_argument("--workdir", required=True)
    p.add_argument("--n", type=int, default=1000)
    p.add_argument("--as-rate", type=float, default=20)
    p.add_argument("--as-burst", type=float, default=40)
    p.add_argument("--send-rate", type=float, default=5)
    p.add_argument("--list-rate", type=float, default=10)
    p.add_argument("--sns-rate", type=float, default=300)
    p.add_argument("--s3-put-rate", type=float, default=3500)
    p.add_argument("--heartbeat-timeout", type=int, default=300)
    p.add_argument("--limit", type=int, default=900, help="seconds to wait for every action")
    p.add_argument("--start-rate", type=float, default=50, help="daemons started per second")
    p.add_argument("--settle", type=float,
                   help="seconds the fleet runs before the scale-in (default: long enough for "
                        "every daemon's first read of its hook, within 30 s of its start, to get "
                        "through the Auto Scaling bucket, as in a fleet long in service)")
    a = p.parse_args()

    import boto3  # moto's dependency, in the test venv

    work = os.path.abspath(a.workdir)
    shutil.rmtree(work, ignore_errors=True)
    os.makedirs(work)
    procs = []

    def cleanup(*_):
        for pr in procs:
            if pr.poll() is None:
                pr.kill()

    signal.signal(signal.SIGTERM, lambda *_: (cleanup(), sys.exit(1)))

    moto_port, control_port, imds_port = free_port(), free_port(), free_port()
    imds_url = f"http://127.0.0.1:{imds_port}"
    moto_log = open(os.path.join(work, "moto.log"), "w")
    procs.append(subprocess.Popen(
        [PY, os.path.join(ROOT, "tests/emulators/moto_lifecycle.py"), "--port", str(moto_port),
         "--control-port", str(control_port), "--imds-url", imds_url,
         "--as-rate", str(a.as_rate), "--as-burst", str(a.as_burst),
         "--send-rate", str(a.send_rate), "--list-rate", str(a.list_rate),
         "--sns-rate", str(a.sns_rate), "--s3-put-rate", str(a.s3_put_rate)],
        stdout=moto_log, stderr=subprocess.STDOUT, cwd=os.path.join(ROOT, "tests/emulators")))
    try:
        run(a, work, procs, moto_port, control_port, imds_port, imds_url, boto3)
    finally:
        cleanup()


def run(a, work, procs, moto_port, control_port, imds_port, imds_url, boto3):
    wait_port(moto_port, "moto")
    wait_port(control_port, "moto's control server")
    endpoint = f"http://127.0.0.1:{moto_port}"
    control = f"http://127.0.0.1:{control_port}"
    session = boto3.session.Session(region_name=REGION, aws_access_key_id=KEYS["AWS_ACCESS_KEY_ID"],
                                    aws_secret_access_key=KEYS["AWS_SECRET_ACCESS_KEY"])
    cfg = __import__("botocore.config", fromlist=["Config"]).Config(
        retries={"mode": "standard", "max_attempts": 20})
    asg = session.client("autoscaling", endpoint_url=endpoint, config=cfg)
    ec2 = session.client("ec2", endpoint_url=endpoint, config=cfg)
    s3 = session.client("s3", endpoint_url=endpoint, config=cfg)
    sns = session.client("sns", endpoint_url=endpoint, config=cfg)

    group, bucket = "fleet", "fleet-archives"
    s3.create_bucket(Bucket=bucket)
    topic = sns.create_topic(Name="fleet")["TopicArn"]
    image = ec2.describe_images()["Images"][0]["ImageId"]
    ec2.create_launch_template(LaunchTemplateName="fleet",
                               LaunchTemplateData={"ImageId": image, "InstanceType": "t3.micro"})
    asg.create_auto_scaling_group(
        AutoScalingGroupName=group, MinSize=0, MaxSize=a.n, DesiredCapacity=a.n,
        LaunchTemplate={"LaunchTemplateName": "fleet"}, AvailabilityZones=[f"{REGION}a"])
    asg.put_lifecycle_hook(
        AutoScalingGroupName=group, LifecycleHookName="lifeboat",
        LifecycleTransition="autoscaling:EC2_INSTANCE_TERMINATING",
        HeartbeatTimeout=a.heartbeat_timeout, DefaultResult="ABANDON")
    ids = [i["InstanceId"] for i in asg.describe_auto_scaling_groups(
        AutoScalingGroupNames=[group])["AutoScalingGroups"][0]["Instances"]]
    assert len(ids) == a.n, f"moto launched {len(ids)} of {a.n}"

    fleet = [{"ip": address(k), "instance_id": i, "group": group} for k, i in enumerate(ids)]
    with open(os.path.join(work, "fleet.json"), "w") as f:
        json.dump(fleet, f)
    procs.append(subprocess.Popen(
        [PY, os.path.join(ROOT, "tests/emulators/imds.py"), "--host", "0.0.0.0",
         "--port", str(imds_port), "--fleet", os.path.join(work, "fleet.json"), "--no-log"],
        stdout=open(os.path.join(work, "imds.log"), "w"), stderr=subprocess.STDOUT))
    wait_port(imds_port, "the IMDS emulator")

    mem_before = mem_used_mib()
    lambda_url = None
    if a.path == "run-command":
        ssm = session.client("ssm", endpoint_url=endpoint, config=cfg)
        lambda_url = start_lambda(a, work, procs, endpoint, control, group, topic, ssm)
    daemons = []
    started = time.time()
    for k, member in enumerate(fleet):
        home = os.path.join(work, "i", member["instance_id"])
        data = os.path.join(home, "data")
        os.makedirs(data)
        with open(os.path.join(data, "app.log"), "wb") as f:
            f.write((f"{member['instance_id']} log line\n" * 800).encode())
        config = os.path.join(home, "lifeboat.toml")
        with open(config, "w") as f:
            f.write(f'[backup]\npaths = ["{data}"]\n\n[s3]\nbucket = "{bucket}"\n'
                    f'\n[sns]\ntopic_arn = "{topic}"\n')
        env = dict(os.environ, **KEYS, AWS_REGION=REGION, AWS_ENDPOINT_URL=endpoint,
                   AWS_EC2_METADATA_SERVICE_ENDPOINT=f"http://{member['ip']}:{imds_port}",
                   LIFEBOAT_CONFIG=config, RUNTIME_DIRECTORY=os.path.join(home, "run"),
                   STATE_DIRECTORY=os.path.join(home, "state"), HOME=home)
        if lambda_url:
            # SSM-managed: the stand-in runs the document here, with this instance's view.
            post_json(control + "/ssm/agents", {
                "instance_id": member["instance_id"], "env": env, "cwd": home,
                "path": f"{os.path.dirname(a.lifeboat)}:/usr/bin:/bin",
                "events_url": lambda_url,
                # The template's CommandRule: only the failures reach the Lambda.
                "event_statuses": ["Failed", "TimedOut", "Cancelled", "Undeliverable"]})
            continue
        pr = subprocess.Popen([a.lifeboat, "run"], env=env, stdin=subprocess.DEVNULL,
                              stdout=open(os.path.join(home, "log"), "w"),
                              stderr=subprocess.STDOUT)
        procs.append(pr)
        daemons.append((member["instance_id"], home, pr))
        # Start at a steady pace: a thousand processes at once would measure fork, not lifeboat.
        time.sleep(max(0.0, started + (k + 1) / a.start_rate - time.time()))
    if daemons:
        end = time.time() + 300
        while time.time() < end:
            ready = sum(os.path.exists(os.path.join(h, "run", "control.sock")) for _, h, _ in daemons)
            dead = [i for i, _, pr in daemons if pr.poll() is not None]
            if dead:
                sys.exit(f"fleet-sim: {len(dead)} daemons exited early, e.g. {dead[0]} (see its log)")
            if ready == len(daemons):
                break
            time.sleep(0.5)
        else:
            sys.exit(f"fleet-sim: only {ready} of {len(daemons)} daemons came up")
        print(f"fleet-sim: {a.n} daemons up in {time.time() - started:.0f} s", file=sys.stderr)
        settle = a.settle if a.settle is not None else max(45.0, 30 + 1.2 * a.n / (a.as_rate or 1e9))
        time.sleep(settle)

    peak = [mem_used_mib()]
    stop = threading.Event()

    def sample():
        while not stop.wait(1):
            peak.append(mem_used_mib())

    threading.Thread(target=sample, daemon=True).start()
    before = get_json(control + "/fleet")
    t0 = time.time()
    asg.set_desired_capacity(AutoScalingGroupName=group, DesiredCapacity=0, HonorCooldown=False)
    print("fleet-sim: scaled in; waiting for every action", file=sys.stderr)
    actions = []
    end = t0 + a.limit
    while time.time() < end:
        actions = [x for x in get_json(control + "/actions") if x["group"] == group]
        if len(actions) == a.n and all(x["result"] for x in actions):
            break
        time.sleep(2)
    stop.set()
    after = get_json(control + "/fleet")

    for _, _, pr in daemons:
        if pr.poll() is None:
            pr.send_signal(signal.SIGTERM)

    keys = []
    for page in s3.get_paginator("list_objects_v2").paginate(Bucket=bucket):
        keys += [o["Key"] for o in page.get("Contents", [])]
    archived = {i for i in ids if any(f"/{i}/" in k and k.endswith(".manifest.json") for k in keys)}
    by = {}
    for x in actions:
        label = f"{x['result']} ({x['ended_by']})" if x["result"] else "still waiting"
        by[label] = by.get(label, 0) + 1
    without = [x["instance_id"] for x in actions
               if x["result"] == "CONTINUE" and x["instance_id"] not in archived]
    last = max((x["ended"] for x in actions if x["ended"]), default=t0) - t0
    stored = [o["LastModified"].timestamp() - t0 for page in
              s3.get_paginator("list_objects_v2").paginate(Bucket=bucket)
              for o in page.get("Contents", []) if o["Key"].endswith(".manifest.json")]
    ops = [op for op in sorted(set(after["calls"]) | set(after["throttled"]))
           if after["calls"].get(op, 0) != before["calls"].get(op, 0)
           or after["throttled"].get(op, 0) != before["throttled"].get(op, 0)]
    per = {op: {
        "calls": (after["calls"].get(op, 0) - before["calls"].get(op, 0)) / a.n,
        "throttled": (after["throttled"].get(op, 0) - before["throttled"].get(op, 0)) / a.n,
    } for op in ops}
    as_calls = sum(v["calls"] for op, v in per.items() if op not in (
        "PutObject", "UploadPart", "Publish", "SendCommand", "ListCommands"))
    throttled_total = sum(v["throttled"] for v in per.values())
    lam = {}
    if lambda_url:
        invocations = get_json(lambda_url.rsplit("/", 1)[0] + "/invocations")
        lifecycle = [i for i in invocations
                     if i["event"].get("source") == "aws.autoscaling"]
        outcomes = {}
        for i in invocations:
            if i.get("source") == "sqs":
                items = ((i["result"] or {}).get("batchItemFailures") or []) if i["ok"] else None
                kind = ("batch (all handled)" if items == [] else
                        "batch (some left for the queue's retry)" if items else
                        "batch (failed)")
            else:
                kind = (i["result"] or {}).get("outcome", "?") if i["ok"] else (
                    "error (retried by Lambda)" if i["attempt"] < 3 else "error (to the DLQ)")
            if i["ok"] is None:
                kind = "unfinished"
            outcomes[kind] = outcomes.get(kind, 0) + 1
        commands = get_json(control + "/ssm/commands")
        with open(os.path.join(work, "commands.json"), "w") as f:
            json.dump(commands, f)
        statuses = {}
        for c in commands:
            statuses[c["status"]] = statuses.get(c["status"], 0) + 1
        queue = get_json(lambda_url.rsplit("/", 1)[0] + "/queue")
        if a.lambda_source == "queue":
            events = queue["sent"]
        else:
            events = len({i["event"]["id"] for i in lifecycle})
        lam = {"invocations": len(invocations),
               "lifecycle_events": events,
               "queue": {k: (len(v) if k == "dead" else v) for k, v in queue.items()},
               "retries": sum(1 for i in invocations if i["attempt"] > 1),
               "outcomes": outcomes, "commands": statuses}
    report = {
        "n": a.n, "path": a.path, "lambda": lam, "rates": {"as": a.as_rate, "as_burst": a.as_burst, "send": a.send_rate,
                            "list": a.list_rate, "sns": a.sns_rate, "s3_put": a.s3_put_rate},
        "archives": len(archived), "actions": by,
        "completions_without_archive": len(without),
        "seconds_to_last_completion": round(last, 1),
        "seconds_to_last_archive": round(max(stored, default=0), 1),
        "auto_scaling_floor_seconds": round(a.n * as_calls / a.as_rate, 1) if a.as_rate else 0,
        "send_command_floor_seconds":
            round(a.n * per.get("SendCommand", {}).get("calls", 0) / a.send_rate, 1)
            if a.send_rate else 0,
        "per_termination": per, "throttled_per_termination": round(throttled_total, 2),
        "peak_memory_mib": round(max(peak) - mem_before, 0),
    }
    with open(os.path.join(work, "report.json"), "w") as f:
        json.dump(report, f, indent=2)
    print(f"fleet of {a.n} ({a.path}): Auto Scaling {a.as_rate:g}/s (burst {a.as_burst:g}), "
          f"SendCommand {a.send_rate:g}/s, ListCommands {a.list_rate:g}/s, "
          f"Publish {a.sns_rate:g}/s, S3 PUT {a.s3_put_rate:g}/s per prefix")
    print(f"  archives            {len(archived)} / {a.n}")
    print(f"  actions             " + ", ".join(f"{v} {k}" for k, v in sorted(by.items())))
    print(f"  completions without an archive: {len(without)}")
    floors = f"the Auto Scaling bucket's floor for {as_calls:.1f} calls each: " \
             f"{report['auto_scaling_floor_seconds']:.0f} s"
    if report["send_command_floor_seconds"]:
        floors += f"; SendCommand's: {report['send_command_floor_seconds']:.0f} s"
    print(f"  last completion     {last:.0f} s after the scale-in ({floors})")
    print(f"  last archive stored {report['seconds_to_last_archive']:.0f} s after the scale-in")
    print(f"  per termination     " + ", ".join(
        f"{op} {v['calls']:.2f}" + (f" (+{v['throttled']:.2f} throttled)" if v["throttled"] else "")
        for op, v in per.items()))
    print(f"  throttled calls     {throttled_total:.2f} per termination")
    if lam:
        print(f"  Lambda              {lam['invocations']} invocations for "
              f"{lam['lifecycle_events']} lifecycle events ({a.lambda_concurrency} at once), "
              f"{lam['retries']} retries: " + ", ".join(
                  f"{v} {k}" for k, v in sorted(lam["outcomes"].items())))
        if a.lambda_source == "queue":
            q = lam["queue"]
            print(f"  lifecycle queue     {q['sent']} messages, {q['receives']} receives, "
                  f"{q['deleted']} deleted, {q['dead']} to the dead-letter queue, "
                  f"{q['in_queue']} left")
        print(f"  Run Command         " + ", ".join(
            f"{v} {k}" for k, v in sorted(lam["commands"].items())))
    print(f"  peak memory         {report['peak_memory_mib']:.0f} MiB above the start")


if __name__ == "__main__":
    main()
