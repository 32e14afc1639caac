//! An HTTP header map as Envoy keeps it: ordered, names lowercase, values bytes,
//! a name may repeat.

/// Header pairs in order.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Headers(pub Vec<(String, Vec<u8>)>);

impl Headers {
    pub fn new() -> Headers {
        Headers(Vec::new())
    }

    /// The first value of `name` (case-insensitive), as Envoy's
    /// `proxy_get_header_map_value` answers. Lossy UTF-8.
    pub fn get(&self, name: &str) -> Option<String> {
        self.get_bytes(name)
            .map(|v| String::from_utf8_lossy(v).into_owned())
    }

    pub fn get_bytes(&self, name: &str) -> Option<&[u8]> {
        let name = name.to_ascii_lowercase();
        self.0
            .iter()
            .find(|(k, _)| *k == name)
            .map(|(_, v)| v.as_slice())
    }

    /// Every value of `name`, in order.
    pub fn get_all(&self, name: &str) -> Vec<String> {
        let name = name.to_ascii_lowercase();
        self.0
            .iter()
            .filter(|(k, _)| *k == name)
            .map(|(_, v)| String::from_utf8_lossy(v).into_owned())
            .collect()
    }

    pub fn contains(&self, name: &str) -> bool {
        self.get_bytes(name).is_some()
    }

    /// Appends a value (Envoy's `addCopy`).
    pub fn add(&mut self, name: &str, value: &[u8]) {
        self.0.push((name.to_ascii_lowercase(), value.to_vec()));
    }

    /// Replaces every value of `name` with one (Envoy's `setCopy`): the first
    /// occurrence keeps its place, the others go.
    pub fn replace(&mut self, name: &str, value: &[u8]) {
        let name = name.to_ascii_lowercase();
        match self.0.iter().position(|(k, _)| *k == name) {
            Some(pos) => {
                if let Some(slot) = self.0.get_mut(pos) {
                    slot.1 = value.to_vec();
                }
                let mut i = 0;
                self.0.retain(|(k, _)| {
                    let keep = *k != name || i == pos;
                    i += 1;
                    keep
                });
            }
            None => self.0.push((name, value.to_vec())),
        }
    }

    pub fn remove(&mut self, name: &str) {
        let name = name.to_ascii_lowercase();
        self.0.retain(|(k, _)| *k != name);
    }

    pub fn len(&self) -> usize {
        self.0.len()
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// Names an upstream could read as `prefix` (lowercase, `-` separated):
    /// any case, `_` for `-`.
    pub fn names_folding_to(&self, prefix: &str) -> Vec<String> {
        self.0
            .iter()
            .filter(|(k, _)| {
                k.len() >= prefix.len()
                    && k.bytes().zip(prefix.bytes()).all(|(c, p)| {
                        let c = c.to_ascii_lowercase();
                        c == p || (p == b'-' && c == b'_')
                    })
            })
            .map(|(k, _)| k.clone())
            .collect()
    }

    /// Names starting with `prefix` (lowercase).
    pub fn names_with_prefix(&self, prefix: &str) -> Vec<String> {
        self.0
            .iter()
            .filter(|(k, _)| k.starts_with(prefix))
            .map(|(k, _)| k.clone())
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn envoy_like_map() {
        let mut h = Headers::new();
        h.add("X-A", b"1");
        h.add("x-b", b"2");
        h.add("x-a", b"3");
        assert_eq!(h.get("x-a").as_deref(), Some("1"));
        assert_eq!(h.get_all("X-A"), vec!["1", "3"]);
        h.replace("x-a", b"9");
        assert_eq!(
            h.0,
            vec![("x-a".into(), b"9".to_vec()), ("x-b".into(), b"2".to_vec())]
        );
        h.remove("X-B");
        assert_eq!(h.len(), 1);
        h.replace("x-c", b"new");
        assert_eq!(h.get("x-c").as_deref(), Some("new"));
    }
}
