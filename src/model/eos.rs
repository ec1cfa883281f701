//! The end-of-sequence ids of a model: generation stops at any of them. Llama 3 lists several
//! (`eos_token_id: [128001, 128008, 128009]` in config.json or generation_config.json), GGUF
//! files name an `eos` and an `eot` (end of turn) token.
//!
//! [`EosIds`] serializes as `config.json` writes the key: `null` when there is none, the id
//! itself when there is one, a list when there are several. A spec with one id therefore
//! serializes (and hashes into its model identity) exactly as when the field was one id.

use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// End-of-sequence token ids, in the order the files list them, without repeats.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct EosIds(Vec<u32>);

impl EosIds {
    /// The ids in `ids`, first occurrence kept.
    pub fn new(ids: impl IntoIterator<Item = u32>) -> EosIds {
        let mut out = EosIds::default();
        out.extend(ids);
        out
    }

    /// One id, or none.
    pub fn one(id: Option<u32>) -> EosIds {
        EosIds::new(id)
    }

    /// Appends the ids not already listed.
    pub fn extend(&mut self, ids: impl IntoIterator<Item = u32>) {
        for id in ids {
            if !self.0.contains(&id) {
                self.0.push(id);
            }
        }
    }

    pub fn ids(&self) -> &[u32] {
        &self.0
    }

    /// The first id (what a single-id consumer such as `tokenizer_config.json` gets).
    pub fn first(&self) -> Option<u32> {
        self.0.first().copied()
    }

    pub fn contains(&self, id: u32) -> bool {
        self.0.contains(&id)
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

impl Serialize for EosIds {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match self.0.as_slice() {
            [] => s.serialize_none(),
            [id] => s.serialize_u32(*id),
            ids => ids.serialize(s),
        }
    }
}

impl<'de> Deserialize<'de> for EosIds {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<EosIds, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            One(u32),
            Many(Vec<u32>),
        }
        Ok(match Option::<Raw>::deserialize(d)? {
            None => EosIds::default(),
            Some(Raw::One(id)) => EosIds::new([id]),
            Some(Raw::Many(ids)) => EosIds::new(ids),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn serializes_as_config_json_writes_it() {
        for (ids, json) in [(vec![], "null"), (vec![2], "2"), (vec![2, 7], "[2,7]")] {
            let e = EosIds::new(ids);
            assert_eq!(serde_json::to_string(&e).unwrap(), json);
            assert_eq!(serde_json::from_str::<EosIds>(json).unwrap(), e);
        }
        assert_eq!(
            serde_json::from_str::<EosIds>("[3, 3, 1]").unwrap().ids(),
            &[3, 1]
        );
        assert!(serde_json::from_str::<EosIds>("\"x\"").is_err());
    }
}
