//! [`StageKey`]: what a stage's output depends on, hashed into the id it is saved under.

use std::collections::HashSet;
use std::fmt;
use std::sync::Arc;

/// The blake3 key-derivation context of stage ids: a change to the encoding below changes it,
/// so ids of two encodings never meet.
const CONTEXT: &str = "shmexec stage key v1";

/// The identity of a stage's output: the stage's name, its version, its configuration and the
/// keys of its inputs (its lineage). Two keys with the same [`id`](Self::id) name the same
/// output; changing any of these, in the stage or in any stage upstream of it, changes the id,
/// so an output saved under the old one is never loaded in its place.
///
/// ```
/// use shmexec::store::StageKey;
///
/// let raw = StageKey::new("raw_records", "1", "run=7");
/// let peaks = StageKey::new("peaks", "0.3", "threshold=1.5").with_input(&raw);
/// let other_run = StageKey::new("peaks", "0.3", "threshold=1.5")
///     .with_input(&StageKey::new("raw_records", "1", "run=8"));
/// assert_ne!(peaks.id(), other_run.id());
/// assert_eq!(peaks.id().len(), 64);
/// let names: Vec<String> = peaks.history().into_iter().map(|s| s.name).collect();
/// assert_eq!(names, ["raw_records", "peaks"]);
/// ```
///
/// The configuration is bytes: a string, or the archive of any value (`rkyv::to_bytes`), in a
/// form that does not change between runs for the same settings. Inputs are positional: a stage
/// whose inputs are `(a, b)` is not the stage whose inputs are `(b, a)`.
#[derive(Clone)]
pub struct StageKey {
    name: String,
    version: String,
    config: Vec<u8>,
    inputs: Vec<Arc<StageKey>>,
    hash: [u8; 32],
}

/// One stage of a stream's lineage, as [`StageKey::history`] and
/// [`SavedStream::history`](super::SavedStream::history) list them.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct HistoryEntry {
    /// The stage's name.
    pub name: String,
    /// The stage's version.
    pub version: String,
    /// The stage key's [`id`](StageKey::id): its configuration and inputs, hashed.
    pub id: String,
}

impl StageKey {
    /// The key of a stage with no inputs (a source). Add inputs with
    /// [`with_input`](Self::with_input).
    pub fn new(
        name: impl Into<String>,
        version: impl Into<String>,
        config: impl AsRef<[u8]>,
    ) -> StageKey {
        let mut key = StageKey {
            name: name.into(),
            version: version.into(),
            config: config.as_ref().to_vec(),
            inputs: Vec::new(),
            hash: [0; 32],
        };
        key.hash = key.compute_hash();
        key
    }

    /// This key with `input` appended to its inputs.
    pub fn with_input(mut self, input: &StageKey) -> StageKey {
        self.inputs.push(Arc::new(input.clone()));
        self.hash = self.compute_hash();
        self
    }

    /// The stage's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The stage's version.
    pub fn version(&self) -> &str {
        &self.version
    }

    /// The stage's configuration bytes.
    pub fn config(&self) -> &[u8] {
        &self.config
    }

    /// The keys of the stage's inputs, in order.
    pub fn inputs(&self) -> impl ExactSizeIterator<Item = &StageKey> {
        self.inputs.iter().map(|k| &**k)
    }

    /// The key's id: 64 hex digits of a blake3 hash over the name, the version, the
    /// configuration and the ids of the inputs, each length-prefixed (inputs by their 32-byte
    /// hashes, after their count), so that no two different keys encode alike.
    pub fn id(&self) -> String {
        blake3::Hash::from_bytes(self.hash).to_hex().to_string()
    }

    /// The stage and every stage upstream of it, in an order they can be processed in (each
    /// after its inputs, inputs in their order, this stage last), each once: a stage reached
    /// along two paths (the same [`id`](Self::id)) is listed where it is first needed.
    pub fn history(&self) -> Vec<HistoryEntry> {
        fn visit(key: &StageKey, seen: &mut HashSet<[u8; 32]>, out: &mut Vec<HistoryEntry>) {
            if seen.contains(&key.hash) {
                return;
            }
            for input in key.inputs() {
                visit(input, seen, out);
            }
            seen.insert(key.hash);
            out.push(HistoryEntry {
                name: key.name.clone(),
                version: key.version.clone(),
                id: key.id(),
            });
        }
        let mut out = Vec::new();
        visit(self, &mut HashSet::new(), &mut out);
        out
    }

    /// The name of the directory the stage's output is saved under: the name, with every
    /// character but ASCII letters, digits, `_` and `-` replaced by `_` and at most 64 of them
    /// kept, a `-`, then the id. It never holds a `.`, which the store's temporary names do.
    pub(crate) fn dir_name(&self) -> String {
        let name: String = self
            .name
            .chars()
            .take(64)
            .map(|c| {
                if c.is_ascii_alphanumeric() || c == '_' || c == '-' {
                    c
                } else {
                    '_'
                }
            })
            .collect();
        format!("{name}-{}", self.id())
    }

    fn compute_hash(&self) -> [u8; 32] {
        let mut h = blake3::Hasher::new_derive_key(CONTEXT);
        for field in [self.name.as_bytes(), self.version.as_bytes(), &self.config] {
            h.update(&(field.len() as u64).to_le_bytes());
            h.update(field);
        }
        h.update(&(self.inputs.len() as u64).to_le_bytes());
        for input in &self.inputs {
            h.update(&input.hash);
        }
        *h.finalize().as_bytes()
    }
}

impl PartialEq for StageKey {
    fn eq(&self, other: &StageKey) -> bool {
        self.hash == other.hash
    }
}

impl Eq for StageKey {}

impl std::hash::Hash for StageKey {
    fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
        self.hash.hash(state);
    }
}

impl fmt::Debug for StageKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("StageKey")
            .field("name", &self.name)
            .field("version", &self.version)
            .field("config_len", &self.config.len())
            .field("inputs", &self.inputs().map(|k| k.id()).collect::<Vec<_>>())
            .field("id", &self.id())
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fields_do_not_run_into_each_other() {
        // Without length prefixes these two would hash the same bytes.
        let a = StageKey::new("ab", "c", "");
        let b = StageKey::new("a", "bc", "");
        assert_ne!(a.id(), b.id());
        let c = StageKey::new("a", "b", "c");
        let d = StageKey::new("a", "bc", "");
        assert_ne!(c.id(), d.id());
    }

    #[test]
    fn inputs_are_positional_and_counted() {
        let x = StageKey::new("x", "1", "");
        let y = StageKey::new("y", "1", "");
        let xy = StageKey::new("s", "1", "").with_input(&x).with_input(&y);
        let yx = StageKey::new("s", "1", "").with_input(&y).with_input(&x);
        assert_ne!(xy.id(), yx.id());
        assert_ne!(xy.id(), StageKey::new("s", "1", "").with_input(&x).id());
        assert_eq!(
            xy,
            StageKey::new("s", "1", "").with_input(&x).with_input(&y)
        );
    }

    #[test]
    fn dir_names_are_plain() {
        let k = StageKey::new("peaks/../ä b.c", "1", "");
        let name = k.dir_name();
        assert!(name.starts_with("peaks____"), "{name}");
        assert!(!name.contains('.') && !name.contains('/'));
        assert!(name.ends_with(&k.id()));
        let long = StageKey::new("n".repeat(300), "1", "");
        assert_eq!(long.dir_name().len(), 64 + 1 + 64);
    }
}
