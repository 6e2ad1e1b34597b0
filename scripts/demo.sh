#!/usr/bin/env bash
# lifeboat's main job, end to end on loopback, with emulated AWS (moto's server extended with
# lifecycle actions, and an IMDSv2 emulator). Nothing leaves this machine.
#   1. by hand: back up a sample tree, list, verify, restore, compare;
#   2. the daemon: an Auto Scaling group with a terminate hook, `lifeboat run` watching instance
#      metadata, a scale-in, the archive in S3, the SNS report, the action completed.
# Installs what is missing first (scripts/bootstrap.sh).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/bootstrap.sh
cargo build --quiet --bin lifeboat
LIFEBOAT="$PWD/target/debug/lifeboat"
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
trap 'kill $moto_pid $imds_pid $daemon_pid 2>/dev/null; rm -rf "$work"' EXIT
wait_port "$port"; wait_port "$control"; wait_port "$imds_port"

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
"$PY" - "$topic" <<'PY'
import json, sys, urllib.request, os
data = json.load(urllib.request.urlopen(os.environ["AWS_ENDPOINT_URL"] + "/moto-api/data.json"))
for t in data["sns"]["Topic"]:
    if t["arn"] == sys.argv[1]:
        for _id, message, subject, attributes, _group in t["sent_notifications"]:
            print("   subject:", subject)
            print("   attributes:", {k: v["Value"] for k, v in attributes.items()})
            print("   message:", json.dumps(json.loads(message), indent=2).replace("\n", "\n   "))
PY
echo; echo "== lifeboat status"; "$LIFEBOAT" status
kill -TERM "$daemon_pid"; wait "$daemon_pid" || true; daemon_pid=
