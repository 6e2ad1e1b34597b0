#!/usr/bin/env bash
# lifeboat's main job, end to end on loopback, with emulated AWS (moto's server extended with
# lifecycle actions, and an IMDSv2 emulator). Nothing leaves this machine.
#   1. by hand: back up a sample tree, list, verify, restore, compare;
#   2. the daemon: an Auto Scaling group with a terminate hook, `lifeboat run` watching instance
#      metadata, a scale-in, the archive in S3, the SNS report, the action completed; then a
#      scale-out with a launch hook: the new instance restores that archive (`restore-on-launch`)
#      and its launch action is completed CONTINUE;
#   3. Run Command: the lifecycle event to the companion Lambda (under a local Runtime API), the
#      lifeboat-backup document run on the instance by the SSM agent stand-in, `lifeboat backup
#      --complete-lifecycle`, the action completed; and an instance SSM cannot reach, completed by
#      the Lambda itself with a report saying the backup did not run.
# Installs what is missing first (scripts/bootstrap.sh --demo: moto's server only).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/bootstrap.sh --demo
echo "demo: building lifeboat and the companion Lambda (a few minutes on a first run)" >&2
cargo build --workspace --bins
LIFEBOAT="$PWD/target/debug/lifeboat"
BOOTSTRAP="$PWD/target/debug/bootstrap"
PY="$PWD/.venv/bin/python"

work=$(mktemp -d /tmp/lifeboat-demo.XXXXXX)
free_port() { "$PY" -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
wait_port() { for _ in $(seq 1 500); do (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null && return; sleep 0.02; done; echo "port $1 never opened" >&2; exit 1; }
port=$(free_port); control=$(free_port); imds_port=$(free_port)
"$PY" tests/emulators/imds.py --port "$imds_port" >"$work/imds.log" 2>&1 &
imds_pid=$!
"$PY" tests/emulators/moto_lifecycle.py --port "$port" --control-port "$control" \
  --imds-url "http://127.0.0.1:$imds_port" >"$work/moto.log" 2>&1 &
moto_pid=$!
daemon_pid=
lambda_pid=
trap 'kill $moto_pid $imds_pid $daemon_pid $lambda_pid 2>/dev/null; rm -rf "$work"' EXIT
wait_port "$port"; wait_port "$control"; wait_port "$imds_port"
# show_reports TOPIC_ARN: the SNS messages moto holds for the topic.
show_reports() {
  "$PY" - "$1" <<'PY'
import json, sys, urllib.request, os
data = json.load(urllib.request.urlopen(os.environ["AWS_ENDPOINT_URL"] + "/moto-api/data.json"))
for t in data["sns"]["Topic"]:
    if t["arn"] == sys.argv[1]:
        for _id, message, subject, attributes, _group in t["sent_notifications"]:
            print("   subject:", subject)
            print("   attributes:", {k: v["Value"] for k, v in attributes.items()})
            print("   message:", json.dumps(json.loads(message), indent=2).replace("\n", "\n   "))
PY
}

export AWS_ENDPOINT_URL="http://127.0.0.1:$port" AWS_REGION=us-east-1 AWS_DEFAULT_REGION=us-east-1
export AWS_ACCESS_KEY_ID=demo AWS_SECRET_ACCESS_KEY=demo
export RUNTIME_DIRECTORY="$work/run" STATE_DIRECTORY="$work/state"
"$PY" -c "import boto3; boto3.client('s3').create_bucket(Bucket='demo-backups')"

echo "== a sample tree: logs, nested directories, a symlink, a hard link, a FIFO"
data="$work/data"
mkdir -p "$data/app/2026/11" "$data/empty"
for i in $(seq 1 200); do echo "2026-11-26T07:00:00Z request $i served in ${i}ms" >>"$data/app/access.log"; done
seq 1 50000 >"$data/app/2026/11/numbers.txt"
ln -s app/access.log "$data/current.log"
ln "$data/app/access.log" "$data/app/access.log.1"
mkfifo "$data/app/control.fifo"

echo; echo "######## 1. by hand (off EC2: no instance metadata, lifeboat runs as 'standalone')"
export AWS_EC2_METADATA_SERVICE_ENDPOINT=http://127.0.0.1:9
cat >"$work/lifeboat.toml" <<TOML
[backup]
paths = ["$data"]
exclude = ["*.tmp"]

[s3]
bucket = "demo-backups"
prefix = "lifeboat/"
TOML
export LIFEBOAT_CONFIG="$work/lifeboat.toml"
echo; echo "== lifeboat config check"; "$LIFEBOAT" config check | head -12; echo "   ..."
echo; echo "== lifeboat backup --dry-run"; "$LIFEBOAT" backup --dry-run
echo; echo "== lifeboat backup"; "$LIFEBOAT" backup --reason demo | tee "$work/backup.out"
key=$(sed -n 's|^stored s3://demo-backups/||p' "$work/backup.out")
echo; echo "== lifeboat list"; "$LIFEBOAT" list
echo; echo "== lifeboat verify --key $key"; "$LIFEBOAT" verify --key "$key"
echo; echo "== lifeboat restore --key $key --to $work/restored"
"$LIFEBOAT" restore --key "$key" --to "$work/restored"
echo; echo "== compare (the FIFO is skipped by design)"
diff -r --no-dereference "$data" "$work/restored$data" && echo "identical" || true

echo; echo "######## 2. the daemon: a scale-in on an Auto Scaling group with a terminate hook"
read -r group instance topic < <("$PY" - <<'PY'
import boto3
asg, sns = boto3.client("autoscaling"), boto3.client("sns")
asg.create_launch_configuration(LaunchConfigurationName="web", ImageId="ami-12c6146b", InstanceType="t3.micro")
asg.create_auto_scaling_group(AutoScalingGroupName="web", LaunchConfigurationName="web",
                              MinSize=0, MaxSize=2, DesiredCapacity=1, AvailabilityZones=["us-east-1a"])
asg.put_lifecycle_hook(AutoScalingGroupName="web", LifecycleHookName="lifeboat",
                       LifecycleTransition="autoscaling:EC2_INSTANCE_TERMINATING",
                       HeartbeatTimeout=60, DefaultResult="ABANDON")
instance = asg.describe_auto_scaling_groups(AutoScalingGroupNames=["web"])["AutoScalingGroups"][0]["Instances"][0]["InstanceId"]
topic = sns.create_topic(Name="lifeboat-reports")["TopicArn"]
print("web", instance, topic)
PY
)
echo "group $group, instance $instance, hook lifeboat (heartbeat timeout 60 s), topic $topic"
# This machine plays the instance: its metadata says who it is and, with tags, its group.
"$PY" -c "import json, sys, urllib.request as u; u.urlopen(u.Request(sys.argv[1], json.dumps({'instance_id': sys.argv[2], 'group': sys.argv[3]}).encode(), method='POST'))" \
  "http://127.0.0.1:$imds_port/_emulator/state" "$instance" "$group"
export AWS_EC2_METADATA_SERVICE_ENDPOINT="http://127.0.0.1:$imds_port"
cat >>"$work/lifeboat.toml" <<TOML

[sns]
topic_arn = "$topic"

[watch]
poll_interval = "1s"
TOML
LIFEBOAT_LOG=info "$LIFEBOAT" run >"$work/daemon.log" 2>&1 &
daemon_pid=$!
for _ in $(seq 1 500); do [ -S "$work/run/control.sock" ] && break; sleep 0.02; done
echo; echo "== lifeboat status (daemon watching)"; "$LIFEBOAT" status
echo; echo "== scale in: desired capacity 1 -> 0"
"$PY" -c "import boto3; boto3.client('autoscaling').set_desired_capacity(AutoScalingGroupName='$group', DesiredCapacity=0)"
echo "   the instance is in Terminating:Wait; instance metadata now says target-lifecycle-state Terminated"
"$PY" - "$control" "$instance" <<'PY'
import json, sys, time, urllib.request
control, instance = sys.argv[1], sys.argv[2]
deadline = time.time() + 120
while time.time() < deadline:
    actions = json.load(urllib.request.urlopen(f"http://127.0.0.1:{control}/actions"))
    done = [a for a in actions if a["instance_id"] == instance and a["result"]]
    if done:
        a = done[0]
        for c in a["calls"]:
            print(f"   {c['time'] - a['started']:6.2f} s  {c['operation']}")
        print(f"   lifecycle action: {a['result']} ({a['ended_by']}) after {a['ended'] - a['started']:.1f} s")
        break
    time.sleep(0.2)
else:
    sys.exit("the lifecycle action was never completed")
PY
echo; echo "== the daemon's log"; sed 's/^/   /' "$work/daemon.log"
echo; echo "== lifeboat list"; "$LIFEBOAT" list
echo; echo "== the SNS report"
show_reports "$topic"
echo; echo "== lifeboat status"; "$LIFEBOAT" status
kill -TERM "$daemon_pid"; wait "$daemon_pid" || true; daemon_pid=

echo; echo "######## 2b. scale out: the replacement restores its predecessor's data (launch hook)"
new_instance=$("$PY" - "$group" <<'PY'
import boto3, sys
asg, group = boto3.client("autoscaling"), sys.argv[1]
asg.put_lifecycle_hook(AutoScalingGroupName=group, LifecycleHookName="lifeboat-launch",
                       LifecycleTransition="autoscaling:EC2_INSTANCE_LAUNCHING",
                       HeartbeatTimeout=60, DefaultResult="ABANDON")
asg.set_desired_capacity(AutoScalingGroupName=group, DesiredCapacity=1)
for i in asg.describe_auto_scaling_groups(AutoScalingGroupNames=[group])["AutoScalingGroups"][0]["Instances"]:
    if i["LifecycleState"] == "Pending:Wait":
        print(i["InstanceId"])
PY
)
echo "desired capacity 0 -> 1: instance $new_instance waits in Pending:Wait on launch hook lifeboat-launch"
# This machine now plays the new instance.
"$PY" -c "import json, sys, urllib.request as u; u.urlopen(u.Request(sys.argv[1], json.dumps({'instance_id': sys.argv[2], 'group': sys.argv[3], 'target_lifecycle_state': 'InService'}).encode(), method='POST'))" \
  "http://127.0.0.1:$imds_port/_emulator/state" "$new_instance" "$group"
cat >>"$work/lifeboat.toml" <<TOML

[restore]
on_launch = true
to = "$work/replacement"
TOML
echo; echo "== lifeboat restore-on-launch (what lifeboat-restore.service runs at boot)"
"$LIFEBOAT" restore-on-launch
echo; echo "== the launch action"
"$PY" - "$control" "$new_instance" <<'PY'
import json, sys, urllib.request
control, instance = sys.argv[1], sys.argv[2]
for a in json.load(urllib.request.urlopen(f"http://127.0.0.1:{control}/actions")):
    if a["instance_id"] == instance and a["result"]:
        print(f"   {a['hook']}: {a['result']} ({a['ended_by']}) after {a['ended'] - a['started']:.1f} s")
PY
echo; echo "== compare with the tree the old instance had (the FIFO is skipped by design)"
diff -r --no-dereference "$data" "$work/replacement$data" && echo "identical" || true

echo; echo "######## 3. Run Command: EventBridge -> companion Lambda -> lifeboat-backup document -> lifeboat"
lambda_port=$(free_port)
read -r api_instance batch_instance topic2 < <("$PY" - <<'PY'
import boto3
asg, sns, ssm = boto3.client("autoscaling"), boto3.client("sns"), boto3.client("ssm")
ids = []
for name in ("api", "batch"):
    asg.create_auto_scaling_group(AutoScalingGroupName=name, LaunchConfigurationName="web",
                                  MinSize=0, MaxSize=2, DesiredCapacity=1, AvailabilityZones=["us-east-1a"])
    asg.put_lifecycle_hook(AutoScalingGroupName=name, LifecycleHookName="lifeboat",
                           LifecycleTransition="autoscaling:EC2_INSTANCE_TERMINATING",
                           HeartbeatTimeout=60, DefaultResult="ABANDON")
    ids.append(asg.describe_auto_scaling_groups(AutoScalingGroupNames=[name])["AutoScalingGroups"][0]["Instances"][0]["InstanceId"])
ssm.create_document(Name="lifeboat-backup", Content=open("ssm-documents/lifeboat-backup.json").read(),
                    DocumentType="Command", DocumentFormat="JSON")
topic = sns.create_topic(Name="lifeboat-lambda-reports")["TopicArn"]
print(ids[0], ids[1], topic)
PY
)
echo "groups api ($api_instance, SSM-managed) and batch ($batch_instance, not managed); document lifeboat-backup"
env LIFEBOAT_SNS_TOPIC_ARN="$topic2" LIFEBOAT_ON_FAILURE=ABANDON \
  "$PY" tests/emulators/lambda_runtime.py --port "$lambda_port" -- "$BOOTSTRAP" >"$work/lambda.log" 2>&1 &
lambda_pid=$!
wait_port "$lambda_port"
# The stand-in runs commands for api's instance with lifeboat on its PATH, off EC2 like part 1.
"$PY" - "$control" "$api_instance" "$lambda_port" "$(dirname "$LIFEBOAT")" "$work" <<'PY'
import json, os, sys, urllib.request
control, instance, lambda_port, bindir, work = sys.argv[1:]
def post(path, body):
    urllib.request.urlopen(urllib.request.Request(f"http://127.0.0.1:{control}{path}", json.dumps(body).encode(), method="POST"))
env = {k: os.environ[k] for k in ("AWS_ENDPOINT_URL", "AWS_REGION", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "LIFEBOAT_CONFIG")}
env.update(AWS_EC2_METADATA_SERVICE_ENDPOINT="http://127.0.0.1:9", RUNTIME_DIRECTORY=f"{work}/run-ssm", STATE_DIRECTORY=f"{work}/state-ssm")
post("/ssm/agents", {"instance_id": instance, "env": env, "path": f"{bindir}:/usr/bin:/bin",
                     "events_url": f"http://127.0.0.1:{lambda_port}/events"})
for group in ("api", "batch"):
    post("/events", {"group": group, "url": f"http://127.0.0.1:{lambda_port}/events"})
PY
echo; echo "== scale in both groups: desired capacity 1 -> 0"
"$PY" -c "import boto3; c = boto3.client('autoscaling'); [c.set_desired_capacity(AutoScalingGroupName=g, DesiredCapacity=0) for g in ('api', 'batch')]"
"$PY" - "$control" "$lambda_port" "$api_instance" "$batch_instance" <<'PY'
import json, sys, time, urllib.request
control, lambda_port, instances = sys.argv[1], sys.argv[2], sys.argv[3:]
get = lambda url: json.load(urllib.request.urlopen(url))
deadline = time.time() + 120
while time.time() < deadline:
    actions = [a for a in get(f"http://127.0.0.1:{control}/actions") if a["instance_id"] in instances]
    if len(actions) == 2 and all(a["result"] for a in actions):
        break
    time.sleep(0.2)
else:
    sys.exit("the lifecycle actions were never completed")
time.sleep(0.5)  # let the last status-change event reach the Lambda, for the listing below
print("   Lambda invocations (event -> outcome, handler time):")
for i in get(f"http://127.0.0.1:{lambda_port}/invocations"):
    r = i["result"] or {}
    what = r.get("command_id") or r.get("why") or r.get("result") or ""
    print(f"     {i['event']['detail-type'][:40]:40} -> {r.get('outcome', i['error'])}: {str(what)[:90]}  ({i['duration_ms']:.0f} ms)")
print("   Run Command on the instance (SSM agent stand-in):")
for c in get(f"http://127.0.0.1:{control}/ssm/commands"):
    print(f"     {c['command_id']} {c['instance_id']}: {' -> '.join(c['statuses'])}, exit {c.get('exit_code')}")
for a in actions:
    print(f"   {a['group']:5} {a['instance_id']}: lifecycle action {a['result']} ({a['ended_by']}) after {a['ended'] - a['started']:.1f} s")
PY
echo; echo "== lifeboat list --instance-id $api_instance"; "$LIFEBOAT" list --instance-id "$api_instance"
echo; echo "== the Lambda's SNS report for batch"
show_reports "$topic2"
