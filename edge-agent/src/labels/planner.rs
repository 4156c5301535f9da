//! The label planner: per label, the content it should show (*desired*) and the content it
//! confirmed it shows (*displayed*, by content hash). A newer content supersedes a pending
//! one; due commands go out in bounded batches; a command not applied is retried with
//! exponential backoff until the label applies it or the content expires (a label that wakes
//! later is brought up to date at its check-in). Acks arrive staged: queued, delivered,
//! applied, failed. Pure: time comes in as `now_ms`, commands go out as values.

use std::collections::{BTreeSet, HashMap};

use serde::{Deserialize, Serialize};
use shared::{DeviceId, Money, Sku};

/// What a label shows.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LabelContent {
    pub sku: Sku,
    pub name: String,
    pub price: Money,
    /// A promotion price and when it ends (Unix ms).
    pub promo: Option<(Money, u64)>,
    /// Price per unit of measure, e.g. per "kg".
    pub unit_price: Option<(Money, String)>,
}

impl LabelContent {
    /// A stable 64-bit hash (FNV-1a over the postcard bytes): what labels report they display.
    pub fn hash(&self) -> u64 {
        let bytes = postcard::to_allocvec(self).expect("LabelContent serialises into a Vec");
        bytes.iter().fold(0xcbf2_9ce4_8422_2325u64, |h, &b| (h ^ u64::from(b)).wrapping_mul(0x0000_0100_0000_01b3))
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
pub enum Stage {
    /// Waiting to be sent (or re-sent).
    Pending,
    Sent,
    Queued,
    Delivered,
    Applied,
    Failed,
    /// Not applied in time; resent when the label checks in.
    Expired,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AckStage {
    Queued,
    Delivered,
    Applied,
    Failed,
}

#[derive(Debug, Clone, Copy)]
pub struct PlannerConfig {
    /// Most render commands per batch (the label infrastructure's and checkout's share).
    pub batch_max: usize,
    pub retry_base_ms: u64,
    pub retry_max_ms: u64,
    /// A content not applied after this long is expired until the label checks in.
    pub expire_after_ms: u64,
}

impl Default for PlannerConfig {
    fn default() -> Self {
        PlannerConfig { batch_max: 500, retry_base_ms: 2_000, retry_max_ms: 120_000, expire_after_ms: 6 * 3_600_000 }
    }
}

/// A render command to send.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RenderCommand {
    pub label: DeviceId,
    /// Identifies this attempt; acks name it.
    pub command_id: u32,
    pub hash: u64,
    pub content: LabelContent,
}

#[derive(Debug, Clone)]
struct Desired {
    content: LabelContent,
    hash: u64,
    since_ms: u64,
    attempts: u32,
    stage: Stage,
    command_id: Option<u32>,
    /// The id of its first attempt: an ack of an earlier command (sent before this content was
    /// wanted) says nothing about whether this one will land.
    first_command: Option<u32>,
    due_ms: u64,
    /// Made due by a check-in (not by the retry interval), for [`SendCounts`].
    after_check_in: bool,
}

impl Desired {
    /// A command toward `content`, due now.
    fn new(content: LabelContent, hash: u64, now_ms: u64) -> Desired {
        Desired {
            content,
            hash,
            since_ms: now_ms,
            attempts: 0,
            stage: Stage::Pending,
            command_id: None,
            first_command: None,
            due_ms: now_ms,
            after_check_in: false,
        }
    }

    /// Whether `command_id` is one of its own attempts (ids go up by one per command, wrapping).
    fn sent_as(&self, command_id: u32) -> bool {
        self.first_command.is_some_and(|first| command_id.wrapping_sub(first) < u32::MAX / 2)
    }
}

#[derive(Debug, Clone)]
struct Label {
    sku: Sku,
    /// What it should show, kept after it applied it, so a check-in showing anything else
    /// (a label that rebooted blank) brings it back.
    target: Option<(LabelContent, u64)>,
    /// The command in progress toward `target`, if any.
    desired: Option<Desired>,
    displayed: Option<u64>,
}

/// Per-stage counts, for metrics and `storectl labels status`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct StageCounts {
    pub up_to_date: usize,
    pub pending: usize,
    pub in_flight: usize,
    pub failed: usize,
    pub expired: usize,
}

/// Render commands sent, by why (on the label board: tells a re-send after a check-in from a
/// retry when labels are told something twice).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct SendCounts {
    /// First attempts toward a content.
    pub first: u64,
    /// Attempts after the retry interval passed without an applied ack.
    pub retries: u64,
    /// Attempts made at once because the label checked in showing something else.
    pub after_check_in: u64,
}

#[derive(Debug, Default)]
pub struct Planner {
    config: PlannerConfig,
    /// What was sent, and why.
    pub sends: SendCounts,
    labels: HashMap<DeviceId, Label>,
    by_sku: HashMap<Sku, BTreeSet<DeviceId>>,
    /// (due time, label) of every desired content waiting to be (re)sent.
    due: BTreeSet<(u64, DeviceId)>,
    /// Labels per SKU with a command in progress: zero means they all show their target.
    unsettled: HashMap<Sku, usize>,
    next_command: u32,
}

impl Planner {
    pub fn new(config: PlannerConfig) -> Planner {
        Planner { config, ..Planner::default() }
    }

    /// Binds a label to a SKU (re-binding drops what it was to show for the old SKU).
    pub fn bind(&mut self, label: DeviceId, sku: Sku) {
        if let Some(old) = self.labels.get(&label) {
            if old.sku == sku {
                return;
            }
            let (old_sku, pending) = (old.sku.clone(), old.desired.is_some());
            if let Some(set) = self.by_sku.get_mut(&old_sku) {
                set.remove(&label);
            }
            self.unschedule(&label);
            if pending {
                self.mark(&old_sku, -1);
            }
        }
        self.by_sku.entry(sku.clone()).or_default().insert(label.clone());
        self.labels.insert(label, Label { sku, target: None, desired: None, displayed: None });
    }

    fn mark(&mut self, sku: &Sku, delta: isize) {
        let n = self.unsettled.entry(sku.clone()).or_default();
        *n = n.saturating_add_signed(delta);
    }

    /// Whether every label of `sku` shows what it should (O(1): kept as labels settle).
    pub fn settled(&self, sku: &Sku) -> bool {
        self.unsettled.get(sku).copied().unwrap_or(0) == 0
            && self.labels_of(sku).next().is_some_and(|l| self.labels[l].target.is_some())
    }

    pub fn sku_of(&self, label: &DeviceId) -> Option<&Sku> {
        self.labels.get(label).map(|l| &l.sku)
    }

    /// Every SKU with at least one label.
    pub fn skus(&self) -> impl Iterator<Item = &Sku> {
        self.by_sku.iter().filter(|(_, l)| !l.is_empty()).map(|(s, _)| s)
    }

    pub fn labels_of(&self, sku: &Sku) -> impl Iterator<Item = &DeviceId> {
        self.by_sku.get(sku).into_iter().flatten()
    }

    fn unschedule(&mut self, label: &DeviceId) {
        if let Some(d) = self.labels.get(label).and_then(|l| l.desired.as_ref()) {
            self.due.remove(&(d.due_ms, label.clone()));
        }
    }

    /// Sets what the label should show. Returns false if it shows it already (nothing to do).
    /// A newer content supersedes a pending one: only the latest is ever sent.
    pub fn set_content(&mut self, label: &DeviceId, content: LabelContent, now_ms: u64) -> bool {
        let hash = content.hash();
        let Some(state) = self.labels.get_mut(label) else { return false };
        state.target = Some((content.clone(), hash));
        if state.displayed == Some(hash) && state.desired.is_none() {
            return false;
        }
        if state.desired.as_ref().is_some_and(|d| d.hash == hash) {
            return true; // already on its way
        }
        self.unschedule(label);
        let state = self.labels.get_mut(label).expect("checked above");
        let (sku, was_pending) = (state.sku.clone(), state.desired.is_some());
        if state.displayed == Some(hash) {
            state.desired = None;
            if was_pending {
                self.mark(&sku, -1);
            }
            return false;
        }
        state.desired = Some(Desired::new(content, hash, now_ms));
        self.due.insert((now_ms, label.clone()));
        if !was_pending {
            self.mark(&sku, 1);
        }
        true
    }

    fn backoff(&self, attempts: u32) -> u64 {
        let exp = self.config.retry_base_ms.saturating_mul(1u64 << attempts.min(20));
        exp.min(self.config.retry_max_ms)
    }

    /// The commands due at `now_ms`, at most `batch_max`, oldest due first. Each is scheduled
    /// for a retry in case it is not applied.
    pub fn next_batch(&mut self, now_ms: u64) -> Vec<RenderCommand> {
        let mut out = Vec::new();
        while out.len() < self.config.batch_max {
            let Some(first) = self.due.first().cloned() else { break };
            if first.0 > now_ms {
                break;
            }
            self.due.pop_first();
            let (due_again, expired) = {
                let Some(d) = self.labels.get(&first.1).and_then(|l| l.desired.as_ref()) else { continue };
                if now_ms.saturating_sub(d.since_ms) > self.config.expire_after_ms {
                    (0, true)
                } else {
                    (now_ms.saturating_add(self.backoff(d.attempts)), false)
                }
            };
            self.next_command = self.next_command.wrapping_add(1);
            let command_id = self.next_command;
            let Some(d) = self.labels.get_mut(&first.1).and_then(|l| l.desired.as_mut()) else { continue };
            if expired {
                d.stage = Stage::Expired;
                d.command_id = None;
                continue;
            }
            if d.after_check_in {
                self.sends.after_check_in += 1;
            } else if d.attempts == 0 {
                self.sends.first += 1;
            } else {
                self.sends.retries += 1;
            }
            d.after_check_in = false;
            d.attempts += 1;
            d.stage = Stage::Sent;
            d.command_id = Some(command_id);
            d.first_command.get_or_insert(command_id);
            d.due_ms = due_again;
            out.push(RenderCommand { label: first.1.clone(), command_id, hash: d.hash, content: d.content.clone() });
            self.due.insert((due_again, first.1));
        }
        out
    }

    /// A staged ack from a label. Returns true when the label now shows its desired content.
    pub fn on_ack(
        &mut self,
        label: &DeviceId,
        command_id: u32,
        stage: AckStage,
        shown_hash: Option<u64>,
        now_ms: u64,
    ) -> bool {
        let Some(state) = self.labels.get_mut(label) else { return false };
        if stage == AckStage::Applied {
            if let Some(h) = shown_hash {
                state.displayed = Some(h);
            }
        }
        let Some(d) = state.desired.as_mut() else {
            // It applied a command after its content was settled (a content changed back while
            // the change was on its way): it shows something else now, so it is sent its
            // content again, as at a check-in.
            if let (Some((content, hash)), Some(shown)) = (state.target.clone(), state.displayed) {
                if stage == AckStage::Applied && shown != hash {
                    state.desired = Some(Desired { after_check_in: true, ..Desired::new(content, hash, now_ms) });
                    self.due.insert((now_ms, label.clone()));
                    let sku = state.sku.clone();
                    self.mark(&sku, 1);
                }
            }
            return false;
        };
        if d.command_id != Some(command_id) {
            // An ack of an earlier attempt of this content: what it says the label shows
            // counts. An ack of a command sent before this content was wanted (another
            // content, or the same one before a repush) does not settle it: a command sent
            // after it may still land, or the label's state was put in doubt.
            return d.sent_as(command_id) && state.displayed == Some(d.hash) && self.settle(label);
        }
        match stage {
            AckStage::Queued => d.stage = Stage::Queued,
            AckStage::Delivered => d.stage = Stage::Delivered,
            AckStage::Applied => {
                state.displayed = Some(shown_hash.unwrap_or(d.hash));
                return self.settle(label);
            }
            AckStage::Failed => {
                d.stage = Stage::Failed;
                let (old_due, attempts) = (d.due_ms, d.attempts);
                let retry = now_ms.saturating_add(self.backoff(attempts));
                if let Some(d) = self.labels.get_mut(label).and_then(|l| l.desired.as_mut()) {
                    d.due_ms = retry;
                }
                self.due.remove(&(old_due, label.clone()));
                self.due.insert((retry, label.clone()));
            }
        }
        false
    }

    /// Clears the desired content once the label shows it.
    fn settle(&mut self, label: &DeviceId) -> bool {
        let Some(state) = self.labels.get(label) else { return false };
        match &state.desired {
            Some(d) if state.displayed == Some(d.hash) => {
                let sku = state.sku.clone();
                self.unschedule(label);
                if let Some(state) = self.labels.get_mut(label) {
                    state.desired = None;
                }
                self.mark(&sku, -1);
                true
            }
            _ => false,
        }
    }

    /// A label woke and says what it shows; anything it lacks is due now (even if expired).
    pub fn on_check_in(&mut self, label: &DeviceId, shown_hash: u64, now_ms: u64) {
        let Some(state) = self.labels.get_mut(label) else { return };
        state.displayed = Some(shown_hash);
        if state.desired.is_none() {
            match state.target.clone() {
                Some((content, hash)) if hash != shown_hash => {
                    state.desired = Some(Desired { after_check_in: true, ..Desired::new(content, hash, now_ms) });
                    self.due.insert((now_ms, label.clone()));
                    let sku = state.sku.clone();
                    self.mark(&sku, 1);
                }
                _ => {}
            }
            return;
        }
        if self.settle(label) {
            return;
        }
        let Some(d) = self.labels.get(label).and_then(|l| l.desired.as_ref()) else { return };
        let old_due = d.due_ms;
        if matches!(d.stage, Stage::Expired) || old_due > now_ms {
            self.due.remove(&(old_due, label.clone()));
            if let Some(d) = self.labels.get_mut(label).and_then(|l| l.desired.as_mut()) {
                if d.stage == Stage::Expired {
                    d.since_ms = now_ms;
                    d.attempts = 0;
                }
                d.stage = Stage::Pending;
                d.due_ms = now_ms;
                d.after_check_in = true;
            }
            self.due.insert((now_ms, label.clone()));
        }
    }

    /// Whether every label of `sku` shows a content with this hash (true if it has no labels).
    pub fn all_show(&self, sku: &Sku, hash_of: impl Fn(&DeviceId) -> Option<u64>) -> bool {
        self.labels_of(sku).all(|l| {
            let state = &self.labels[l];
            state.desired.is_none() && state.displayed.is_some() && state.displayed == hash_of(l)
        })
    }

    /// Labels whose displayed content differs from what they should show (`expected`, e.g. the
    /// content rendered from the effective price), with their SKU: the list for staff.
    pub fn mismatches(&self, expected: impl Fn(&Sku) -> Option<u64>) -> Vec<(DeviceId, Sku)> {
        let mut out: Vec<_> = self
            .labels
            .iter()
            .filter(|(_, s)| expected(&s.sku).is_some_and(|h| s.displayed != Some(h)))
            .map(|(l, s)| (l.clone(), s.sku.clone()))
            .collect();
        out.sort();
        out
    }

    /// Labels not (known to be) showing what they should, with their SKU, sorted: the list for
    /// staff ("which shelves show something other than the till").
    pub fn mismatched(&self) -> Vec<(DeviceId, Sku)> {
        let mut out: Vec<_> = self
            .labels
            .iter()
            .filter(|(_, s)| s.target.as_ref().is_some_and(|(_, h)| s.displayed != Some(*h)))
            .map(|(l, s)| (l.clone(), s.sku.clone()))
            .collect();
        out.sort();
        out
    }

    pub fn displayed(&self, label: &DeviceId) -> Option<u64> {
        self.labels.get(label).and_then(|s| s.displayed)
    }

    pub fn stage(&self, label: &DeviceId) -> Option<Stage> {
        let s = self.labels.get(label)?;
        Some(s.desired.as_ref().map_or(Stage::Applied, |d| d.stage))
    }

    /// Forgets what the label was confirmed to show, so its target is sent again (a repush
    /// after labels were swapped or a gateway lost its state). Returns false for an unknown label.
    pub fn forget_displayed(&mut self, label: &DeviceId) -> bool {
        match self.labels.get_mut(label) {
            Some(state) => {
                state.displayed = None;
                true
            }
            None => false,
        }
    }

    /// How many labels are bound.
    pub fn labels_len(&self) -> usize {
        self.labels.len()
    }

    /// The id of the last command decided (ids go up by one per command, from 1).
    pub fn last_command_id(&self) -> u32 {
        self.next_command
    }

    pub fn counts(&self) -> StageCounts {
        let mut c = StageCounts::default();
        for s in self.labels.values() {
            match s.desired.as_ref().map(|d| d.stage) {
                None => c.up_to_date += 1,
                Some(Stage::Pending) => c.pending += 1,
                Some(Stage::Sent | Stage::Queued | Stage::Delivered | Stage::Applied) => c.in_flight += 1,
                Some(Stage::Failed) => c.failed += 1,
                Some(Stage::Expired) => c.expired += 1,
            }
        }
        c
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use shared::Currency;

    fn id(s: &str) -> DeviceId {
        DeviceId::new(s).unwrap()
    }
    fn content(cents: i64) -> LabelContent {
        LabelContent {
            sku: Sku::new("MILK").unwrap(),
            name: "Milk 1 l".into(),
            price: Money::new(cents, Currency::new("EUR").unwrap()),
            promo: None,
            unit_price: None,
        }
    }
    fn planner(batch: usize) -> Planner {
        let mut p = Planner::new(PlannerConfig {
            batch_max: batch,
            retry_base_ms: 1_000,
            retry_max_ms: 8_000,
            expire_after_ms: 60_000,
        });
        for i in 0..5 {
            p.bind(id(&format!("esl-{i}")), Sku::new("MILK").unwrap());
        }
        p
    }

    /// The command the next batch at `now` sends `label`, if any.
    fn sent_to(p: &mut Planner, label: &DeviceId, now: u64) -> Option<RenderCommand> {
        p.next_batch(now).into_iter().find(|c| &c.label == label)
    }

    /// `label` acks `cmd` as applied; whether that settled it.
    fn applied(p: &mut Planner, label: &DeviceId, cmd: &RenderCommand, now: u64) -> bool {
        p.on_ack(label, cmd.command_id, AckStage::Applied, Some(cmd.hash), now)
    }

    #[test]
    fn a_late_ack_of_an_earlier_command_does_not_cancel_a_repush() {
        let mut p = planner(10);
        let label = id("esl-0");
        p.set_content(&label, content(119), 0);
        let first = sent_to(&mut p, &label, 0).unwrap();
        // A check-in crossing the first command makes the hub send it again; the first ack
        // settles it, the second ack is still on its way.
        p.on_check_in(&label, 0, 1);
        let again = sent_to(&mut p, &label, 1).unwrap();
        assert!(applied(&mut p, &label, &first, 2));
        // A repush, then the late ack: the repush is still sent.
        p.forget_displayed(&label);
        assert!(p.set_content(&label, content(119), 3));
        assert!(!applied(&mut p, &label, &again, 4));
        let repush = sent_to(&mut p, &label, 4).expect("the repush goes out");
        assert!(repush.command_id > again.command_id);
        assert!(applied(&mut p, &label, &repush, 5));
    }

    #[test]
    fn a_label_that_applies_a_change_after_it_was_undone_is_sent_its_content_again() {
        let mut p = planner(10);
        let label = id("esl-0");
        p.set_content(&label, content(119), 0);
        let a = sent_to(&mut p, &label, 0).unwrap();
        applied(&mut p, &label, &a, 1);
        // 1.19 -> 0.99 -> 1.19 while the 0.99 command is on its way.
        p.set_content(&label, content(99), 2);
        let b = sent_to(&mut p, &label, 2).unwrap();
        assert!(!p.set_content(&label, content(119), 3), "it was last seen showing 1.19");
        assert_eq!(p.stage(&label), Some(Stage::Applied));
        // The 0.99 command lands: the label shows 0.99, not what it should.
        applied(&mut p, &label, &b, 4);
        assert_eq!(p.mismatched(), vec![(label.clone(), Sku::new("MILK").unwrap())]);
        let fix = sent_to(&mut p, &label, 4).expect("1.19 is sent again");
        assert_eq!((fix.hash, fix.content.price.minor), (a.hash, 119));
        assert!(applied(&mut p, &label, &fix, 5));
        assert!(p.mismatched().is_empty());
    }

    #[test]
    fn a_forgotten_label_is_sent_its_content_again() {
        let mut p = planner(10);
        let label = id("esl-0");
        p.set_content(&label, content(119), 0);
        let cmd = sent_to(&mut p, &label, 0).unwrap();
        applied(&mut p, &label, &cmd, 1);
        assert!(!p.set_content(&label, content(119), 2), "it shows it: nothing to send");
        assert!(p.forget_displayed(&label));
        assert!(p.set_content(&label, content(119), 3), "forgotten: sent again");
        assert!(p.next_batch(3).iter().any(|c| c.label == label));
        assert!(!p.forget_displayed(&id("nobody")));
    }

    #[test]
    fn newer_content_supersedes_and_batches_are_bounded() {
        let mut p = planner(2);
        for i in 0..5 {
            p.set_content(&id(&format!("esl-{i}")), content(119), 0);
        }
        p.set_content(&id("esl-0"), content(99), 1); // supersedes before it was sent
        let first = p.next_batch(10);
        assert_eq!(first.len(), 2);
        let all: Vec<_> = first.into_iter().chain(p.next_batch(10)).chain(p.next_batch(10)).collect();
        assert_eq!(all.len(), 5, "each label once");
        assert_eq!(all.iter().find(|c| c.label == id("esl-0")).unwrap().content.price.minor, 99);
        assert!(p.next_batch(10).is_empty(), "nothing due until the retry time");
    }

    #[test]
    fn retries_back_off_until_applied_and_late_acks_of_superseded_commands_do_not_confuse() {
        let mut p = planner(10);
        let l = id("esl-1");
        p.set_content(&l, content(119), 0);
        let c1 = p.next_batch(0).remove(0);
        assert!(p.next_batch(999).is_empty());
        let c2 = p.next_batch(1_000).remove(0);
        assert_ne!(c1.command_id, c2.command_id);
        assert!(p.next_batch(2_999).is_empty(), "backoff doubled");
        p.on_ack(&l, c2.command_id, AckStage::Queued, None, 1_100);
        assert_eq!(p.stage(&l), Some(Stage::Queued));
        // Meanwhile the price changes again; then the old command's Applied arrives.
        p.set_content(&l, content(129), 1_200);
        assert!(!p.on_ack(&l, c1.command_id, AckStage::Applied, Some(content(119).hash()), 1_300));
        assert_eq!(p.displayed(&l), Some(content(119).hash()));
        let c3 = p.next_batch(1_300).remove(0);
        assert_eq!(c3.content.price.minor, 129);
        assert!(p.on_ack(&l, c3.command_id, AckStage::Applied, Some(c3.hash), 1_400));
        assert_eq!(p.stage(&l), Some(Stage::Applied));
        assert!(p.next_batch(100_000).is_empty(), "applied: never told again");
        assert!(!p.set_content(&l, content(129), 100_000), "already shown");
    }

    #[test]
    fn unapplied_content_expires_and_a_check_in_brings_it_back() {
        let mut p = planner(10);
        let l = id("esl-2");
        p.set_content(&l, content(119), 0);
        let mut now = 0;
        while now < 70_000 {
            for c in p.next_batch(now) {
                p.on_ack(&l, c.command_id, AckStage::Failed, None, now);
            }
            now += 500;
        }
        assert_eq!(p.stage(&l), Some(Stage::Expired));
        assert_eq!(p.counts().expired, 1);
        p.on_check_in(&l, 0xdead, 80_000);
        let c = p.next_batch(80_000);
        assert_eq!(c.len(), 1, "sent again at check-in");
        // A label that checks in showing the desired content is settled without a command.
        let l3 = id("esl-3");
        p.set_content(&l3, content(119), 80_000);
        p.on_check_in(&l3, content(119).hash(), 80_001);
        assert_eq!(p.stage(&l3), Some(Stage::Applied));
        // The label reboots blank: its check-in brings the content back.
        p.on_check_in(&l3, 0, 90_000);
        let again = p.next_batch(90_000);
        assert!(again.iter().any(|c| c.label == l3 && c.hash == content(119).hash()), "{again:?}");
    }

    proptest::proptest! {
        /// Whatever the order of price changes, lost and failed acks: once every label applied
        /// its latest content, each shows the last content set, and none is told again.
        #[test]
        fn labels_converge_on_the_last_content_and_are_not_told_again(
            ops in proptest::collection::vec((0usize..5, 0i64..4, 0u8..3), 1..60),
        ) {
            let mut p = planner(3);
            let mut last = std::collections::HashMap::new();
            let mut now = 0u64;
            for (label, price, fate) in ops {
                let l = id(&format!("esl-{label}"));
                p.set_content(&l, content(100 + price), now);
                last.insert(l, content(100 + price).hash());
                now += 700;
                for c in p.next_batch(now) {
                    match fate {
                        0 => { p.on_ack(&c.label, c.command_id, AckStage::Applied, Some(c.hash), now); }
                        1 => { p.on_ack(&c.label, c.command_id, AckStage::Failed, None, now); }
                        _ => {} // ack lost
                    }
                }
            }
            // The labels come back and apply everything they are sent.
            for _ in 0..50 {
                now += 10_000;
                for c in p.next_batch(now) {
                    p.on_ack(&c.label, c.command_id, AckStage::Applied, Some(c.hash), now);
                }
            }
            for (l, h) in &last {
                proptest::prop_assert_eq!(p.displayed(l), Some(*h));
            }
            proptest::prop_assert!(p.next_batch(u64::MAX / 2).is_empty(), "nothing told twice after it applied");
        }
    }

    #[test]
    fn mismatches_and_all_show() {
        let mut p = planner(10);
        let sku = Sku::new("MILK").unwrap();
        let want = content(99).hash();
        for i in 0..5 {
            p.on_check_in(&id(&format!("esl-{i}")), if i < 3 { want } else { content(119).hash() }, 0);
        }
        let mm = p.mismatches(|_| Some(want));
        assert_eq!(mm.iter().map(|(l, _)| l.as_str()).collect::<Vec<_>>(), vec!["esl-3", "esl-4"]);
        for i in 0..5 {
            p.set_content(&id(&format!("esl-{i}")), content(99), 0);
        }
        assert_eq!(p.mismatched().iter().map(|(l, _)| l.as_str()).collect::<Vec<_>>(), vec!["esl-3", "esl-4"]);
        assert!(!p.all_show(&sku, |_| Some(want)));
        for i in 3..5 {
            p.on_check_in(&id(&format!("esl-{i}")), want, 1);
        }
        assert!(p.all_show(&sku, |_| Some(want)));
    }

    #[test]
    fn settled_tracks_every_label_of_a_sku_in_constant_time() {
        let mut p = planner(10);
        let sku = Sku::new("MILK").unwrap();
        assert!(!p.settled(&sku), "nothing to show yet");
        for i in 0..5 {
            p.set_content(&id(&format!("esl-{i}")), content(119), 0);
        }
        assert!(!p.settled(&sku));
        for c in p.next_batch(0) {
            assert!(!p.settled(&sku));
            p.on_ack(&c.label, c.command_id, AckStage::Applied, Some(c.hash), 1);
        }
        assert!(p.settled(&sku));
        p.on_check_in(&id("esl-0"), 0, 2); // rebooted blank
        assert!(!p.settled(&sku));
    }

    #[test]
    fn sends_are_counted_by_why() {
        let mut p = planner(10);
        let (a, b) = (id("esl-0"), id("esl-1"));
        p.set_content(&a, content(119), 0);
        p.set_content(&b, content(119), 0);
        assert_eq!(p.next_batch(0).len(), 2);
        // a's check-in crosses its command: sent again at once; b's ack never comes: retried.
        p.on_check_in(&a, 0, 10);
        assert_eq!(p.next_batch(10).len(), 1);
        assert_eq!(p.next_batch(1_000).len(), 1);
        assert_eq!(p.sends, SendCounts { first: 2, retries: 1, after_check_in: 1 });
    }
}
