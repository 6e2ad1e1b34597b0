//! One event in, one outcome out: the lifecycle event becomes a Run Command, a failed command (or
//! a command Run Command would not take) becomes a completed lifecycle action and a report.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet, VecDeque};
use std::sync::Mutex;
use std::time::{Duration, SystemTime};

use aws_config::BehaviorVersion;
use aws_config::retry::RetryConfig;
use aws_config::timeout::TimeoutConfig;
use aws_lambda_events::event::eventbridge::EventBridgeEvent;
use lifeboat_common::document::{BackupParams, TOKEN, is_instance_id};
use lifeboat_common::event::{
    COMMAND_STATUS, CommandStatus, INVOCATION_STATUS, InvocationStatus, LifecycleAction,
    TEST_NOTIFICATION,
};
use lifeboat_common::lifecycle::{ActionRef, Completed, LAUNCHING, Lifecycle, TERMINATING};
use lifeboat_common::report::{self, Report};
use serde_json::{Value, json};
use tokio::time::Instant;

use crate::config::{Config, LAUNCH};
use crate::queue;
use crate::ssm::{Ssm, SsmError};

/// SendCommand takes at most 50 instance ids.
pub const MAX_TARGETS: usize = 50;

/// How long one SSM call may take.
const SSM_ATTEMPT_TIMEOUT: Duration = Duration::from_secs(10);

/// Time kept back from SendCommand's retries for a fail-over completion and its report.
const FAIL_OVER_RESERVE: Duration = Duration::from_secs(3);

/// At most this much of the budget goes to checking the document (cached while warm): the rest is
/// SendCommand's. A throttled check is skipped (SendCommand says InvalidDocument itself).
const DOCUMENT_BUDGET: Duration = Duration::from_secs(3);

/// How long the retries of an event left for retry take to run out: Lambda's two retries of a
/// failed asynchronous invocation, about one and two minutes after the failures, each up to the
/// function's timeout; or the lifecycle queue's next delivery (the template's visibility
/// timeout, 180 s).
/// An action with less time left than this is renewed (one heartbeat) before it is left to them.
const RETRY_HORIZON: Duration = Duration::from_secs(240);

/// An event's time is when Auto Scaling sent it, a moment after the action began, to the second:
/// the action is said to have begun this much earlier.
const BEGAN_MARGIN: Duration = Duration::from_secs(30);

/// At most this much of the budget goes to reading a hook's heartbeat timeout.
const HOOK_BUDGET: Duration = Duration::from_secs(3);

/// How long a hook's heartbeat timeout, once read, is passed on without reading it again.
const HOOK_TTL: Duration = Duration::from_secs(300);

/// At most this much of the budget goes to renewing an action (one heartbeat, retried if
/// throttled).
const RENEW_BUDGET: Duration = Duration::from_secs(8);

/// What renewing a lifecycle action came to.
enum Renewed {
    /// The hook's timeout starts over.
    Yes,
    /// No active lifecycle action: the agent completed it, or it expired.
    Gone,
    /// The heartbeat failed (throttled past its budget, or refused).
    Failed,
}

/// A lifecycle event to act on: what the document will need, and how long ago it happened.
#[derive(Debug)]
pub(crate) struct Pending {
    /// The document's parameters for this instance.
    pub(crate) params: BackupParams,
    /// Time since the event (zero once the action is renewed).
    pub(crate) age: Duration,
}

impl Pending {
    /// The lifecycle event `event` asks for, or the outcome of ignoring it.
    pub(crate) fn of(event: EventBridgeEvent<Value>) -> Result<Self, Value> {
        let d: LifecycleAction = serde_json::from_value(event.detail)
            .map_err(|e| ignored(format!("malformed lifecycle action: {e}")))?;
        if d.event.as_deref() == Some(TEST_NOTIFICATION) {
            return Err(ignored("Auto Scaling test notification"));
        }
        if d.lifecycle_transition != TERMINATING && d.lifecycle_transition != LAUNCHING {
            return Err(ignored(format!(
                "transition {:?} is neither {TERMINATING} nor {LAUNCHING}",
                d.lifecycle_transition
            )));
        }
        if !is_instance_id(&d.ec2_instance_id) {
            return Err(ignored(format!(
                "instance id {:?} is not an EC2 instance id",
                d.ec2_instance_id
            )));
        }
        let reason = if d.lifecycle_transition == LAUNCHING {
            LAUNCH
        } else if d.destination.as_deref() == Some("WarmPool") {
            "warm-pool"
        } else {
            "scale-in"
        };
        let age = event.time.and_then(|t| {
            let now = SystemTime::now()
                .duration_since(SystemTime::UNIX_EPOCH)
                .ok()?;
            now.checked_sub(Duration::from_secs(u64::try_from(t.timestamp()).ok()?))
        });
        Ok(Pending {
            params: BackupParams {
                instance_id: d.ec2_instance_id,
                group: d.auto_scaling_group_name,
                hook: d.lifecycle_hook_name,
                token: d.lifecycle_action_token,
                reason: reason.into(),
                heartbeat_timeout: String::new(),
                began_after: String::new(),
            },
            age: age.unwrap_or_default(),
        })
    }
}

/// What became of one event.
#[derive(Debug)]
pub(crate) enum Fate {
    /// Handled (sent, completed, ignored): the outcome.
    Done(Value),
    /// To be retried later (SSM or Auto Scaling throttled past the budget): why.
    Retry(String),
}

impl From<Result<Value, lambda_runtime::Error>> for Fate {
    fn from(r: Result<Value, lambda_runtime::Error>) -> Self {
        match r {
            Ok(v) => Fate::Done(v),
            Err(e) => Fate::Retry(e.to_string()),
        }
    }
}

/// The warm function's state: configuration and clients, built once per cold start.
#[derive(Debug)]
pub struct Handler {
    config: Config,
    ssm: Ssm,
    lifecycle: Lifecycle,
    sns: aws_sdk_sns::Client,
    /// Heartbeat timeouts of the hooks read, by group and hook, and when.
    hooks: Mutex<HashMap<(String, String), (u64, Instant)>>,
}

/// What the invocation did, returned as its result (and logged).
pub(crate) fn outcome(kind: &str, fields: Value) -> Value {
    let mut v = json!({ "outcome": kind });
    if let (Some(map), Value::Object(extra)) = (v.as_object_mut(), fields) {
        map.extend(extra);
    }
    tracing::info!(%v, "done");
    v
}

pub(crate) fn ignored(why: impl Into<String>) -> Value {
    outcome("ignored", json!({ "why": why.into() }))
}

/// The outcome for an event whose action is no longer active when renewed: completed (by the
/// agent watching instance metadata) or expired. Nothing is sent to an instance on its way out.
fn gone(params: &BackupParams, age: Duration) -> Value {
    tracing::warn!(
        instance_id = %params.instance_id,
        late_s = age.as_secs(),
        "no active lifecycle action for a late event: completed on the instance, or expired while \
         the event waited (a scale-in larger than SendCommand and the Lambda could keep up with: \
         raise the hook's heartbeat timeout, or run the daemon)"
    );
    outcome(
        "already-completed",
        json!({
            "instance_id": params.instance_id,
            "why": format!(
                "no active lifecycle action {} s after the event: completed on the instance, or expired",
                age.as_secs()
            ),
        }),
    )
}

/// When an action whose event is `age` old (zero: renewed just now) began at the earliest, as
/// the document's `ActionBeganAfter`: [`BEGAN_MARGIN`] before, in whole seconds (RFC 3339).
fn began_after(age: Duration) -> String {
    let at = SystemTime::now()
        .checked_sub(age + BEGAN_MARGIN)
        .and_then(|t| t.duration_since(SystemTime::UNIX_EPOCH).ok())
        .map(|d| d.as_secs());
    at.and_then(|secs| {
        aws_sdk_ssm::primitives::DateTime::from_secs(i64::try_from(secs).ok()?)
            .fmt(aws_sdk_ssm::primitives::DateTimeFormat::DateTime)
            .ok()
    })
    .unwrap_or_default()
}

/// The document's name, whether configured as a name or an ARN.
fn document_name(doc: &str) -> &str {
    doc.rsplit_once(":document/").map_or(doc, |(_, name)| name)
}

impl Handler {
    /// Builds the clients from the SDK's standard settings (region, credentials, endpoints).
    pub async fn new(config: Config) -> Self {
        let sdk = aws_config::defaults(BehaviorVersion::latest())
            .timeout_config(
                TimeoutConfig::builder()
                    .connect_timeout(Duration::from_secs(2))
                    .operation_attempt_timeout(Duration::from_secs(5))
                    .build(),
            )
            .load()
            .await;
        // The loops in `ssm` and `lifecycle` own retries and the time budget (the SDK's own
        // retries would multiply the throttled calls in a mass scale-in).
        // A SendCommand to 50 instances may take SSM longer than a heartbeat; an attempt cut
        // short may still have sent the command (`Ssm::send` looks before sending again).
        let ssm = aws_sdk_ssm::config::Builder::from(&sdk)
            .retry_config(RetryConfig::disabled())
            .timeout_config(
                TimeoutConfig::builder()
                    .connect_timeout(Duration::from_secs(2))
                    .operation_attempt_timeout(SSM_ATTEMPT_TIMEOUT)
                    .build(),
            )
            .build();
        Handler {
            config,
            ssm: Ssm::new(aws_sdk_ssm::Client::from_conf(ssm)),
            // The agent's grace for "no active lifecycle action" too: one second after the
            // event it may be eventual consistency, not a completed action.
            lifecycle: Lifecycle::new(aws_sdk_autoscaling::Client::from_conf(
                aws_sdk_autoscaling::config::Builder::from(&sdk)
                    .retry_config(RetryConfig::disabled())
                    .build(),
            )),
            sns: aws_sdk_sns::Client::new(&sdk),
            hooks: Mutex::new(HashMap::new()),
        }
    }

    /// Handles one invocation: an EventBridge event, or an SQS batch of them (the lifecycle
    /// queue). `Err` only for what a retry can fix (throttling, 5xx); a batch instead names the
    /// messages to retry in `batchItemFailures`.
    pub async fn handle(
        &self,
        payload: Value,
        deadline: SystemTime,
    ) -> Result<Value, lambda_runtime::Error> {
        let left = deadline
            .duration_since(SystemTime::now())
            .unwrap_or_default();
        let until = Instant::now() + left.saturating_sub(Duration::from_millis(500));
        if let Some(messages) = queue::messages(&payload) {
            return Ok(self.on_queue(messages, until).await);
        }
        let event: EventBridgeEvent<Value> = match serde_json::from_value(payload) {
            Ok(e) => e,
            Err(e) => return Ok(ignored(format!("not an EventBridge event: {e}"))),
        };
        if lifeboat_common::event::is_lifecycle_action(&event.detail_type) {
            let pending = match Pending::of(event) {
                Ok(p) => p,
                Err(ignore) => return Ok(ignore),
            };
            return match self.dispatch(vec![pending], until).await.pop() {
                Some(Fate::Done(v)) => Ok(v),
                Some(Fate::Retry(why)) => Err(why.into()),
                None => Ok(ignored("nothing to do")),
            };
        }
        self.on_status(event, until).await
    }

    /// A Run Command status change; anything else is ignored.
    pub(crate) async fn on_status(
        &self,
        event: EventBridgeEvent<Value>,
        until: Instant,
    ) -> Result<Value, lambda_runtime::Error> {
        match event.detail_type.as_str() {
            COMMAND_STATUS => match serde_json::from_value(event.detail) {
                Ok(detail) => self.on_command(detail, until).await,
                Err(e) => Ok(ignored(format!("malformed command status: {e}"))),
            },
            INVOCATION_STATUS => match serde_json::from_value(event.detail) {
                Ok(detail) => self.on_invocation(detail, until).await,
                Err(e) => Ok(ignored(format!("malformed invocation status: {e}"))),
            },
            other => Ok(ignored(format!("event type {other:?} is not lifeboat's"))),
        }
    }

    /// The action to complete: by token when it is a well-formed token, else by instance id.
    fn action(params: &BackupParams) -> ActionRef {
        ActionRef {
            group: params.group.clone(),
            hook: params.hook.clone(),
            instance_id: params.instance_id.clone(),
            token: (!params.token.is_empty() && TOKEN.allows(&params.token))
                .then(|| params.token.clone()),
        }
    }

    /// Sends the document for lifecycle events: one SendCommand per group, hook and reason for
    /// up to [`MAX_TARGETS`] instances (a lone instance gets its own parameters and token).
    /// Only a cause retrying cannot fix (not managed, no document, a refused value) completes an
    /// action here; SSM throttling past the budget leaves the event for retry (Lambda's retries
    /// of the invocation, or the queue's redelivery) while the hook holds the instance, unless
    /// the action would expire before the retries run. One fate per event, in order.
    pub(crate) async fn dispatch(&self, mut events: Vec<Pending>, until: Instant) -> Vec<Fate> {
        let mut fates: Vec<Option<Fate>> = events.iter().map(|_| None).collect();
        let send_until = until
            .checked_sub(FAIL_OVER_RESERVE)
            .unwrap_or_else(Instant::now);
        let mut live = Vec::new();
        let mut seen = HashSet::new();
        for (i, p) in events.iter().enumerate() {
            if p.params.reason == LAUNCH && self.config.restore_document.is_none() {
                fates[i] = Some(Fate::Done(ignored(
                    "a launch event, and LIFEBOAT_RESTORE_DOCUMENT is not set: restores at \
                     launch are not run through Run Command",
                )));
            } else if let Err(refused) = p.params.validate() {
                let fate = self.fail_over(&p.params, refused.to_string(), until).await;
                fates[i] = Some(fate.into());
            } else if !seen.insert(p.params.instance_id.as_str()) {
                // The same action twice in one batch (EventBridge and SQS deliver at least
                // once): one command.
                fates[i] = Some(Fate::Done(outcome(
                    "duplicate",
                    json!({ "instance_id": p.params.instance_id, "why": "twice in one batch" }),
                )));
            } else {
                live.push(i);
            }
        }
        // An event that waited (Lambda's queue in a mass scale-in, its retries) may leave the
        // agent little of the hook's timeout: renew the action first, so the command has a
        // whole timeout to start in.
        let renew_until = send_until.min(Instant::now() + RENEW_BUDGET);
        let mut sendable = Vec::new();
        for i in live {
            let p = &mut events[i];
            if self
                .config
                .heartbeat_timeout
                .is_some_and(|h| p.age >= h / 2)
            {
                match self.renew(&p.params, renew_until).await {
                    Renewed::Yes => p.age = Duration::ZERO,
                    Renewed::Gone => {
                        fates[i] = Some(Fate::Done(gone(&p.params, p.age)));
                        continue;
                    }
                    Renewed::Failed => {}
                }
            }
            sendable.push(i);
        }
        let documents: BTreeSet<&str> = sendable
            .iter()
            .map(|&i| self.config.document_for(&events[i].params.reason))
            .collect();
        let document_until = send_until.min(Instant::now() + DOCUMENT_BUDGET);
        for document in documents {
            match self.ssm.check_document(document, document_until).await {
                Ok(()) => {}
                Err(e) if e.retryable() => tracing::warn!("document check skipped: {e}"),
                Err(e) => {
                    let (missing, rest) = sendable.into_iter().partition(|&i| {
                        self.config.document_for(&events[i].params.reason) == document
                    });
                    sendable = rest;
                    for i in missing {
                        let fate = self
                            .fail_over(&events[i].params, e.to_string(), until)
                            .await;
                        fates[i] = Some(fate.into());
                    }
                }
            }
        }
        // Group by what the command's parameters say for all of its instances.
        let mut groups: BTreeMap<(String, String, String), Vec<usize>> = BTreeMap::new();
        for &i in &sendable {
            let p = &events[i].params;
            groups
                .entry((p.group.clone(), p.hook.clone(), p.reason.clone()))
                .or_default()
                .push(i);
        }
        // The hook's heartbeat timeout goes with the command, so that a thousand instances do
        // not each describe the hook (one Auto Scaling call each, from the shared bucket): one
        // read per group (cached while warm); when it fails, the agents read it.
        let hook_until = send_until.min(Instant::now() + HOOK_BUDGET);
        for ((group, hook, reason), members) in &groups {
            let first = &events[members[0]].params.instance_id;
            let transition = if reason == LAUNCH {
                LAUNCHING
            } else {
                TERMINATING
            };
            if let Some(secs) = self
                .hook_timeout(group, hook, transition, first, hook_until)
                .await
            {
                for &i in members {
                    events[i].params.heartbeat_timeout = secs.to_string();
                }
            }
        }
        let mut work: VecDeque<Vec<usize>> = groups
            .into_values()
            .flat_map(|g| {
                g.chunks(MAX_TARGETS)
                    .map(<[usize]>::to_vec)
                    .collect::<Vec<_>>()
            })
            .collect();
        while let Some(chunk) = work.pop_front() {
            self.send_chunk(&events, chunk, &mut fates, &mut work, until, send_until)
                .await;
        }
        fates
            .into_iter()
            .map(|f| f.unwrap_or_else(|| Fate::Done(ignored("not sent"))))
            .collect()
    }

    /// One SendCommand for `chunk`; instances SSM refuses as not managed are failed over and
    /// the rest sent again (singly when SSM's answer does not say which).
    async fn send_chunk(
        &self,
        events: &[Pending],
        chunk: Vec<usize>,
        fates: &mut [Option<Fate>],
        work: &mut VecDeque<Vec<usize>>,
        until: Instant,
        send_until: Instant,
    ) {
        let first = &events[chunk[0]].params;
        let document = self.config.document_for(&first.reason);
        let began_after = chunk
            .iter()
            .map(|&i| events[i].age)
            .max()
            .map(began_after)
            .unwrap_or_default();
        let mut params = if chunk.len() == 1 {
            // A dedupe, never at the send's expense: one attempt, and on any error none.
            match self.ssm.already_sent(document, first).await {
                Ok(Some(id)) => {
                    fates[chunk[0]] = Some(Fate::Done(outcome(
                        "duplicate",
                        json!({ "command_id": id, "instance_id": first.instance_id }),
                    )));
                    return;
                }
                Ok(None) => {}
                Err(e) => tracing::warn!("no look for an earlier command: {e}"),
            }
            first.clone()
        } else {
            // Each instance runs it as itself and completes its action by instance id.
            BackupParams {
                instance_id: String::new(),
                token: String::new(),
                ..first.clone()
            }
        };
        params.began_after = began_after;
        let ids: Vec<String> = chunk
            .iter()
            .map(|&i| events[i].params.instance_id.clone())
            .collect();
        match self
            .ssm
            .send(&self.config, document, &params, &ids, send_until)
            .await
        {
            Ok(id) => {
                if chunk.len() > 1 {
                    tracing::info!(command_id = %id, instances = ids.len(), group = %params.group, "one command for many instances");
                }
                for &i in &chunk {
                    fates[i] = Some(Fate::Done(outcome(
                        "sent",
                        json!({ "command_id": id, "instance_id": events[i].params.instance_id }),
                    )));
                }
            }
            Err(SsmError::NotManaged { instance_ids, .. })
                if chunk.len() > 1 && instance_ids.len() == chunk.len() =>
            {
                // SSM did not say which: one command each.
                work.extend(chunk.into_iter().map(|i| vec![i]));
            }
            Err(SsmError::NotManaged {
                instance_ids,
                message,
            }) => {
                let (named, rest): (Vec<usize>, Vec<usize>) = chunk
                    .into_iter()
                    .partition(|&i| instance_ids.contains(&events[i].params.instance_id));
                for i in named {
                    let p = &events[i].params;
                    let why = format!(
                        "instance {} is not managed by SSM ({message})",
                        p.instance_id
                    );
                    fates[i] = Some(if p.reason == LAUNCH {
                        // A launching instance's SSM Agent registers a little after boot: the
                        // event is retried while the hook holds the instance.
                        let e = SsmError::Refused {
                            operation: "SendCommand",
                            message: format!("{why}: not yet, at launch"),
                        };
                        self.leave_for_retry(&events[i], &e, until).await
                    } else {
                        self.fail_over(p, why, until).await.into()
                    });
                }
                if !rest.is_empty() {
                    work.push_back(rest);
                }
            }
            Err(e) if e.retryable() => {
                for i in chunk {
                    fates[i] = Some(self.leave_for_retry(&events[i], &e, until).await);
                }
            }
            Err(e) => {
                for i in chunk {
                    let fate = self
                        .fail_over(&events[i].params, e.to_string(), until)
                        .await;
                    fates[i] = Some(fate.into());
                }
            }
        }
    }

    /// SSM stayed throttled: the event is left for retry while the hook holds the instance; an
    /// action that would expire before the retries run is renewed first (completed when it
    /// cannot be).
    async fn leave_for_retry(&self, p: &Pending, e: &SsmError, until: Instant) -> Fate {
        if self.expires_before_retries(p.age) {
            match self.renew(&p.params, until).await {
                Renewed::Yes => {}
                Renewed::Gone => return Fate::Done(gone(&p.params, p.age)),
                Renewed::Failed => {
                    return self.fail_over(&p.params, e.to_string(), until).await.into();
                }
            }
        }
        tracing::warn!(
            instance_id = %p.params.instance_id,
            "{e}: leaving the event for retry; the hook holds the instance"
        );
        Fate::Retry(format!(
            "{e} (the lifecycle action is left for Lambda's retry)"
        ))
    }

    /// The heartbeat timeout of `group`'s hook `hook` in seconds (for `for_instance`'s command,
    /// named in errors): read once per [`HOOK_TTL`] (DescribeLifecycleHooks). When it cannot be
    /// read by `until`: `LIFEBOAT_HEARTBEAT_TIMEOUT`, or `None` when that is unset (the agent
    /// then describes the hook itself).
    async fn hook_timeout(
        &self,
        group: &str,
        hook: &str,
        transition: &str,
        for_instance: &str,
        until: Instant,
    ) -> Option<u64> {
        let key = (group.to_owned(), hook.to_owned());
        if let Some((secs, at)) = self.hooks.lock().expect("not poisoned").get(&key)
            && at.elapsed() < HOOK_TTL
        {
            return Some(*secs);
        }
        match self
            .lifecycle
            .hook_for(group, transition, Some(hook), for_instance, until)
            .await
        {
            Ok(h) => {
                let secs = h.heartbeat_timeout.as_secs();
                self.hooks
                    .lock()
                    .expect("not poisoned")
                    .insert(key, (secs, Instant::now()));
                Some(secs)
            }
            Err(e) => {
                // The template sets the hook's timeout and LIFEBOAT_HEARTBEAT_TIMEOUT from one
                // parameter: in a mass scale-in the shared bucket is busiest exactly now, and
                // without a value every instance would describe the hook itself.
                let configured = self.config.heartbeat_timeout.map(|t| t.as_secs());
                tracing::warn!(%group, %hook, ?configured, "hook not read, passing LIFEBOAT_HEARTBEAT_TIMEOUT (unset: each instance reads it): {e}");
                configured
            }
        }
    }

    /// One heartbeat for the event's action, within [`RENEW_BUDGET`] and before `until`.
    async fn renew(&self, params: &BackupParams, until: Instant) -> Renewed {
        let until = until.min(Instant::now() + RENEW_BUDGET);
        match self.lifecycle.heartbeat(&Self::action(params), until).await {
            Ok(true) => {
                tracing::info!(instance_id = %params.instance_id, "lifecycle action renewed");
                Renewed::Yes
            }
            Ok(false) => Renewed::Gone,
            Err(e) => {
                tracing::warn!(instance_id = %params.instance_id, "lifecycle action not renewed: {e}");
                Renewed::Failed
            }
        }
    }

    /// Whether an action whose event is `age` old would expire before Lambda's retries have
    /// run (unknown heartbeat timeout: no, the hook's own timeout ends the wait).
    fn expires_before_retries(&self, age: Duration) -> bool {
        self.config
            .heartbeat_timeout
            .is_some_and(|h| age + RETRY_HORIZON >= h)
    }

    /// The outcome for a status change of another document's command, or `None` for lifeboat's.
    fn not_ours(&self, document: &str) -> Option<Value> {
        let ours = document == document_name(&self.config.document)
            || self
                .config
                .restore_document
                .as_deref()
                .is_some_and(|d| document == document_name(d));
        (!ours).then(|| ignored(format!("document {document:?} is not lifeboat's")))
    }

    /// A command's status: a failed command sent to one instance completes that instance's
    /// action (its parameters name it). A command sent to many is left to its invocations'
    /// events.
    async fn on_command(
        &self,
        d: CommandStatus,
        until: Instant,
    ) -> Result<Value, lambda_runtime::Error> {
        if let Some(other) = self.not_ours(&d.document_name) {
            return Ok(other);
        }
        if !d.failed() {
            return Ok(ignored(format!("command {} is {}", d.command_id, d.status)));
        }
        let Some(params) = BackupParams::from_parameters(&d.parameters) else {
            return Ok(ignored(format!(
                "command {} carries no lifeboat parameters",
                d.command_id
            )));
        };
        if params.instance_id.is_empty() {
            return Ok(ignored(format!(
                "command {} went to many instances: each invocation's status completes its action",
                d.command_id
            )));
        }
        let why = format!(
            "Run Command ended {} for command {} (see its output)",
            d.status, d.command_id
        );
        self.fail_over(&params, why, until).await
    }

    /// One instance's invocation of a command: when it failed and the command went to many
    /// instances, the command's parameters (ListCommands) give the group and hook, and the
    /// event the instance. A command sent to one instance is left to the command's event.
    async fn on_invocation(
        &self,
        d: InvocationStatus,
        until: Instant,
    ) -> Result<Value, lambda_runtime::Error> {
        if let Some(other) = self.not_ours(&d.document_name) {
            return Ok(other);
        }
        if !d.failed() {
            return Ok(ignored(format!(
                "command {} on {} is {}",
                d.command_id, d.instance_id, d.status
            )));
        }
        if !is_instance_id(&d.instance_id) {
            return Ok(ignored(format!(
                "instance id {:?} is not an EC2 instance id",
                d.instance_id
            )));
        }
        let mut params = match self.ssm.command_parameters(&d.command_id, until).await {
            Ok(Some(p)) => p,
            Ok(None) => {
                return Ok(ignored(format!(
                    "command {} is unknown or carries no lifeboat parameters",
                    d.command_id
                )));
            }
            Err(e) if e.retryable() => return Err(e.to_string().into()),
            Err(e) => {
                return Ok(outcome(
                    "failed",
                    json!({ "instance_id": d.instance_id, "why": e.to_string() }),
                ));
            }
        };
        if !params.instance_id.is_empty() {
            return Ok(ignored(format!(
                "command {} went to one instance: the command's status completes its action",
                d.command_id
            )));
        }
        params.instance_id = d.instance_id;
        let why = format!(
            "Run Command ended {} for command {} on {} (see its output)",
            d.status, d.command_id, params.instance_id
        );
        self.fail_over(&params, why, until).await
    }

    /// Completes the action with the configured result, and reports why the backup did not run
    /// or failed. "No active lifecycle action" (the agent completed it) is success.
    async fn fail_over(
        &self,
        params: &BackupParams,
        why: String,
        until: Instant,
    ) -> Result<Value, lambda_runtime::Error> {
        let result = self.config.on_failure_for(&params.reason);
        tracing::warn!(instance_id = %params.instance_id, %why, "completing the lifecycle action");
        let action = Self::action(params);
        match self.lifecycle.complete(&action, result, until).await {
            Ok(Completed::AlreadyDone) => Ok(outcome(
                "already-completed",
                json!({ "instance_id": params.instance_id, "why": why }),
            )),
            Ok(Completed::Now) => {
                self.report(params, &why, Some(result.as_str())).await;
                Ok(outcome(
                    "completed",
                    json!({
                        "instance_id": params.instance_id,
                        "result": result.as_str(),
                        "why": why,
                    }),
                ))
            }
            Err(e) if e.retryable() => Err(format!("{why}; then {e}").into()),
            Err(e) => {
                let why = format!("{why}; the lifecycle action could not be completed: {e}");
                self.report(params, &why, None).await;
                Ok(outcome(
                    "failed",
                    json!({ "instance_id": params.instance_id, "why": why }),
                ))
            }
        }
    }

    async fn report(&self, params: &BackupParams, why: &str, result: Option<&str>) {
        let Some(topic) = &self.config.topic_arn else {
            return;
        };
        let report = if params.reason == LAUNCH {
            Report::restore(
                "restore-failed",
                &params.instance_id,
                &params.group,
                None,
                "",
                Some(format!("the restore did not run or did not finish: {why}")),
                result.map(str::to_owned),
            )
        } else {
            Report::without_backup(
                "not-run",
                &params.instance_id,
                &params.group,
                &params.reason,
                format!("the backup did not run or did not finish: {why}"),
                result.map(str::to_owned),
            )
        };
        if let Err(e) = report::publish(&self.sns, topic, &report).await {
            tracing::warn!("SNS report not sent: {e}");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn document_arn_or_name() {
        assert_eq!(
            document_name("arn:aws:ssm:us-east-1:123456789012:document/lifeboat-backup"),
            "lifeboat-backup"
        );
        assert_eq!(document_name("lifeboat-backup"), "lifeboat-backup");
    }

    #[test]
    fn began_after_is_the_event_time_less_the_margin_in_whole_seconds() {
        let text = began_after(Duration::from_secs(90));
        assert!(
            lifeboat_common::document::BEGAN_AFTER.allows(&text),
            "{text}"
        );
        let parsed = aws_sdk_ssm::primitives::DateTime::from_str(
            &text,
            aws_sdk_ssm::primitives::DateTimeFormat::DateTime,
        )
        .unwrap();
        let now = SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .unwrap()
            .as_secs();
        let ago = now - u64::try_from(parsed.secs()).unwrap();
        assert!((120..=121).contains(&ago), "{text}: {ago} s ago");
    }

    #[test]
    fn a_malformed_token_completes_by_instance_id() {
        let mut params = BackupParams {
            instance_id: "i-0123456789abcdef0".into(),
            group: "web".into(),
            hook: "lifeboat".into(),
            token: "'; rm -rf / #".into(),
            reason: "scale-in".into(),
            heartbeat_timeout: String::new(),
            began_after: String::new(),
        };
        assert_eq!(Handler::action(&params).token, None);
        params.token = "87654321-4321-4321-4321-210987654321".into();
        assert_eq!(
            Handler::action(&params).token.as_deref(),
            Some("87654321-4321-4321-4321-210987654321")
        );
    }
}
