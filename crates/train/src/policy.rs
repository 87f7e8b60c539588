//! What to do with checkpoints: save, mark best, keep, delete.
//!
//! The decisions live in one object whose answers are unit-tested, as burn-train's
//! `CheckpointingStrategy` returns `CheckpointingAction`s; the trainer only carries them out.
//! Two rules it exists to keep:
//! - `best` always names the weights of the best evaluation: a checkpoint is saved whenever an
//!   evaluation improves (as nanoGPT saves in its eval branch), whatever `save_steps` says.
//! - Rotation never deletes the checkpoints `best` and `latest` name, nor the newest one known
//!   to go on to a finite step (the fallback when training diverges).

/// One thing to do after a step.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CheckpointAction {
    /// Write a checkpoint of the current weights and point `latest` to it.
    Save,
    /// Point `best` to the checkpoint just saved.
    MarkBest,
}

/// How a step ended, as far as checkpoints care.
#[derive(Debug, Clone, Copy, Default)]
pub struct StepEnd {
    /// Optimizer steps done.
    pub step: usize,
    /// The run's last step.
    pub last: bool,
    /// The run stops after this step (Ctrl-C, early stopping).
    pub stopping: bool,
    /// An evaluation ran after this step: whether it improved on the best so far.
    pub improved: Option<bool>,
}

/// The checkpoint decisions of one run.
#[derive(Debug, Clone)]
pub struct CheckpointPolicy {
    save_steps: usize,
    keep_last: usize,
    /// The newest checkpoint whose weights went on to a finite step.
    known_good: Option<String>,
    /// The newest checkpoint not yet known to.
    unproven: Option<String>,
}

impl CheckpointPolicy {
    /// `save_steps` 0 saves only when needed (improvement, end, stop); `keep_last` is at
    /// least 1. A resumed run's checkpoint is unproven until a step on it is finite.
    pub fn new(save_steps: usize, keep_last: usize, resumed_from: Option<String>) -> Self {
        Self {
            save_steps,
            keep_last: keep_last.max(1),
            known_good: None,
            unproven: resumed_from,
        }
    }

    /// What to do after a step.
    pub fn after_step(&self, end: &StepEnd) -> Vec<CheckpointAction> {
        let improved = end.improved == Some(true);
        let scheduled = self.save_steps > 0 && end.step.is_multiple_of(self.save_steps);
        if !(end.last || end.stopping || improved || scheduled) {
            return Vec::new();
        }
        let mut actions = vec![CheckpointAction::Save];
        if improved {
            actions.push(CheckpointAction::MarkBest);
        }
        actions
    }

    /// A step ran: a finite one proves the newest checkpoint before it.
    pub fn stepped(&mut self, finite: bool) {
        if finite && let Some(proven) = self.unproven.take() {
            self.known_good = Some(proven);
        }
    }

    /// A checkpoint `name` was saved; `finite` when the weights came from a finite step.
    pub fn saved(&mut self, name: &str, finite: bool) {
        if finite {
            self.unproven = Some(name.to_string());
        }
    }

    /// The newest checkpoint known to go on to a finite step.
    pub fn known_good(&self) -> Option<&str> {
        self.known_good.as_deref()
    }

    /// The step folders to delete among `existing`, given what `best` and `latest` name:
    /// all but the newest `keep_last` (by step number), `best`, `latest` and the known-good one.
    pub fn to_delete(
        &self,
        existing: &[String],
        best: Option<&str>,
        latest: Option<&str>,
    ) -> Vec<String> {
        let mut steps: Vec<(usize, &String)> = existing
            .iter()
            .filter_map(|name| step_number(name).map(|n| (n, name)))
            .collect();
        steps.sort();
        let newest: Vec<&String> = steps
            .iter()
            .rev()
            .take(self.keep_last)
            .map(|(_, name)| *name)
            .collect();
        let protected = [best, latest, self.known_good.as_deref()];
        steps
            .iter()
            .map(|(_, name)| *name)
            .filter(|name| !newest.contains(name) && !protected.contains(&Some(name.as_str())))
            .cloned()
            .collect()
    }
}

/// The step of a `step-0000100` folder name (numbers, not names, order checkpoints: a run past
/// step 9,999,999 has longer names).
pub fn step_number(name: &str) -> Option<usize> {
    name.strip_prefix("step-")?.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;
    use CheckpointAction::{MarkBest, Save};

    fn end(step: usize, improved: Option<bool>) -> StepEnd {
        StepEnd {
            step,
            improved,
            ..StepEnd::default()
        }
    }

    #[test]
    fn an_improving_evaluation_saves_and_marks_best_off_the_save_schedule() {
        // configs/dapt-pubmed.toml's shape: evaluate every 100, save every 200 (here 3 and 2).
        let policy = CheckpointPolicy::new(2, 2, None);
        assert_eq!(policy.after_step(&end(1, None)), vec![]);
        assert_eq!(policy.after_step(&end(2, None)), vec![Save]);
        assert_eq!(policy.after_step(&end(3, Some(true))), vec![Save, MarkBest]);
        assert_eq!(policy.after_step(&end(6, Some(false))), vec![Save]);
        assert_eq!(policy.after_step(&end(9, Some(false))), vec![]);
        assert_eq!(policy.after_step(&end(4, Some(true))), vec![Save, MarkBest]);
    }

    #[test]
    fn the_last_step_and_a_stop_always_save() {
        let policy = CheckpointPolicy::new(0, 2, None);
        assert_eq!(policy.after_step(&end(7, None)), vec![]);
        let last = StepEnd {
            last: true,
            ..end(7, None)
        };
        assert_eq!(policy.after_step(&last), vec![Save]);
        let stopping = StepEnd {
            stopping: true,
            ..end(5, Some(false))
        };
        assert_eq!(policy.after_step(&stopping), vec![Save]);
    }

    fn names(steps: &[usize]) -> Vec<String> {
        steps.iter().map(|s| format!("step-{s:07}")).collect()
    }

    #[test]
    fn rotation_keeps_the_newest_best_latest_and_known_good() {
        let mut policy = CheckpointPolicy::new(1, 2, None);
        let existing = names(&[1, 2, 3, 4, 5, 6]);
        assert_eq!(
            policy.to_delete(&existing, Some("step-0000002"), Some("step-0000006")),
            names(&[1, 3, 4])
        );
        policy.saved("step-0000003", true);
        // Not yet proven: the step after it was not run.
        assert_eq!(policy.known_good(), None);
        policy.stepped(false);
        assert_eq!(policy.known_good(), None);
        policy.stepped(true);
        assert_eq!(policy.known_good(), Some("step-0000003"));
        assert_eq!(
            policy.to_delete(&existing, Some("step-0000002"), Some("step-0000006")),
            names(&[1, 4])
        );
    }

    #[test]
    fn rotation_orders_by_step_number_not_by_name() {
        let policy = CheckpointPolicy::new(1, 1, None);
        let existing = vec!["step-9999999".to_string(), "step-10000000".to_string()];
        assert_eq!(
            policy.to_delete(&existing, None, None),
            vec!["step-9999999".to_string()]
        );
    }

    #[test]
    fn a_resumed_checkpoint_is_proven_by_a_finite_step() {
        let mut policy = CheckpointPolicy::new(1, 1, Some("step-0000010".to_string()));
        assert_eq!(policy.known_good(), None);
        policy.stepped(true);
        assert_eq!(policy.known_good(), Some("step-0000010"));
        // A checkpoint saved after a skipped step is not a candidate.
        policy.saved("step-0000011", false);
        policy.stepped(true);
        assert_eq!(policy.known_good(), Some("step-0000010"));
    }
}
