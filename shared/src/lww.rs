//! Last-writer-wins register keyed by HLC stamp: the building block of prices and catalog
//! fields. Merge keeps the value with the greater stamp; equal stamps (which a correct HLC never
//! produces for different values) tie-break on the value so that merge stays commutative.

use serde::{Deserialize, Serialize};

use crate::hlc::HlcStamp;

#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Lww<T> {
    pub value: T,
    pub stamp: HlcStamp,
}

impl<T: Ord + Clone> Lww<T> {
    pub fn new(value: T, stamp: HlcStamp) -> Lww<T> {
        Lww { value, stamp }
    }

    /// Whether `other` wins against `self`.
    pub fn loses_to(&self, other: &Lww<T>) -> bool {
        (&other.stamp, &other.value) > (&self.stamp, &self.value)
    }

    /// Merges `other` in; returns whether the register changed.
    pub fn merge(&mut self, other: &Lww<T>) -> bool {
        if self.loses_to(other) {
            *self = other.clone();
            true
        } else {
            false
        }
    }
}

/// Merges into an optional register (absent = never written).
pub fn merge_opt<T: Ord + Clone>(slot: &mut Option<Lww<T>>, other: &Lww<T>) -> bool {
    match slot {
        Some(current) => current.merge(other),
        None => {
            *slot = Some(other.clone());
            true
        }
    }
}
