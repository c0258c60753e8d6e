//! The deterministic mapping from the federation's tools to MCP tool names
//! (`^[a-zA-Z0-9_-]{1,64}$`), the same on every broker for the same set of
//! tools. The rule (also in docs/mcp.md):
//!
//! 1. `clean(s)` replaces every character outside `[A-Za-z0-9_-]` by `_`
//!    (`shell.run` becomes `shell_run`).
//! 2. Offers of one FEM tool name whose description and input schema agree
//!    are one MCP tool, `clean(tool)`, called by capability on any agent
//!    that offers it.
//! 3. Offers of one FEM tool name that disagree collide: each is listed
//!    under its agent, `clean(agent)__clean(tool)`, and called on that agent.
//! 4. Every offer also answers, unlisted, to its per-agent name
//!    `clean(agent)__clean(tool)`, which calls that agent.
//! 5. A name longer than 64 characters, or one that two different tools
//!    would get, is cut to 55 characters and followed by `-` and the first
//!    8 hex digits of SHA-256 of what it names (the FEM tool name, or
//!    `agent/tool`). Listed names take precedence over per-agent aliases;
//!    a name still taken after that is dropped (first in sorted order wins).
//!
//! The input is sorted first, so the answer does not depend on the order
//! in which routes arrived.

use std::collections::{BTreeMap, HashSet};

use fem_proto::{AgentId, Capability, ToolSpec};
use sha2::Digest as _;

/// Longest MCP tool name clients accept.
pub(crate) const MAX_NAME: usize = 64;

/// One tool offered by one agent, as discovery reports it.
#[derive(Clone, Debug)]
pub(crate) struct Offer {
    /// The agent offering it.
    pub(crate) agent: AgentId,
    /// The agent's capabilities.
    pub(crate) capabilities: Vec<Capability>,
    /// The tool.
    pub(crate) tool: ToolSpec,
}

/// How a name is called.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum Route {
    /// By capability, on any agent among `offers` (rule 2).
    Capability,
    /// On this agent (rules 3 and 4).
    Agent(AgentId),
}

/// One MCP name and what it calls.
#[derive(Clone, Debug)]
pub(crate) struct Named {
    /// The MCP tool name.
    pub(crate) name: String,
    /// The FEM tool it calls.
    pub(crate) tool: Capability,
    /// By capability or on one agent.
    pub(crate) route: Route,
    /// Listed by tools/list (aliases are not).
    pub(crate) listed: bool,
    /// Indices into the sorted offers this name covers.
    pub(crate) offers: Vec<usize>,
}

/// `s` with every character outside `[A-Za-z0-9_-]` replaced by `_`.
pub(crate) fn clean(s: &str) -> String {
    s.chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '_' || c == '-' {
                c
            } else {
                '_'
            }
        })
        .collect()
}

/// Whether MCP clients accept `name`.
pub(crate) fn valid(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= MAX_NAME
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
}

/// `name` cut to fit with a hash of `key` (rule 5).
fn hashed(name: &str, key: &str) -> String {
    let digest = sha2::Sha256::digest(key.as_bytes());
    let mut cut: String = name.chars().take(MAX_NAME - 9).collect();
    cut.push('-');
    cut.push_str(&hex::encode(&digest[..4]));
    cut
}

/// The per-agent name of `tool` on `agent` (rule 3 and 4).
fn per_agent(agent: &AgentId, tool: &Capability) -> String {
    format!("{}__{}", clean(agent.as_str()), clean(tool.as_str()))
}

/// Sorts `offers` by (tool, agent) and names them; the returned indices
/// refer to the sorted vector.
pub(crate) fn assign(offers: &mut [Offer]) -> Vec<Named> {
    offers.sort_by(|a, b| (&a.tool.name, &a.agent).cmp(&(&b.tool.name, &b.agent)));
    // Rule 2 and 3: group by FEM tool name.
    let mut groups: BTreeMap<&Capability, Vec<usize>> = BTreeMap::new();
    for (i, o) in offers.iter().enumerate() {
        groups.entry(&o.tool.name).or_default().push(i);
    }
    // (wanted name, key for rule 5, entry)
    let mut listed: Vec<(String, String, Named)> = Vec::new();
    for (tool, idx) in &groups {
        let first = &offers[idx[0]].tool;
        let agree = idx.iter().all(|&i| same_spec(&offers[i].tool, first));
        if agree {
            listed.push((
                clean(tool.as_str()),
                tool.as_str().to_owned(),
                Named {
                    name: String::new(),
                    tool: (*tool).clone(),
                    route: Route::Capability,
                    listed: true,
                    offers: idx.clone(),
                },
            ));
        } else {
            for &i in idx {
                let o = &offers[i];
                listed.push((
                    per_agent(&o.agent, tool),
                    format!("{}/{}", o.agent, tool),
                    Named {
                        name: String::new(),
                        tool: (*tool).clone(),
                        route: Route::Agent(o.agent.clone()),
                        listed: true,
                        offers: vec![i],
                    },
                ));
            }
        }
    }
    // Rule 4: aliases for every offer.
    let mut aliases: Vec<(String, String, Named)> = offers
        .iter()
        .enumerate()
        .map(|(i, o)| {
            (
                per_agent(&o.agent, &o.tool.name),
                format!("{}/{}", o.agent, o.tool.name),
                Named {
                    name: String::new(),
                    tool: o.tool.name.clone(),
                    route: Route::Agent(o.agent.clone()),
                    listed: false,
                    offers: vec![i],
                },
            )
        })
        .collect();
    let mut out = Vec::new();
    let mut taken = HashSet::new();
    for set in [&mut listed, &mut aliases] {
        // Rule 5: names two keys want, or too long, get a hash.
        let mut wanted: BTreeMap<&str, HashSet<&str>> = BTreeMap::new();
        for (name, key, _) in set.iter() {
            wanted.entry(name).or_default().insert(key);
        }
        let names: Vec<String> = set
            .iter()
            .map(|(name, key, _)| {
                if name.len() > MAX_NAME || wanted.get(name.as_str()).is_some_and(|k| k.len() > 1) {
                    hashed(name, key)
                } else {
                    name.clone()
                }
            })
            .collect();
        for ((_, _, mut named), name) in set.drain(..).zip(names) {
            if taken.insert(name.clone()) {
                named.name = name;
                out.push(named);
            }
        }
    }
    out
}

fn same_spec(a: &ToolSpec, b: &ToolSpec) -> bool {
    a.description == b.description
        && (a.input_schema == b.input_schema
            || a.input_schema.parse().ok() == b.input_schema.parse().ok())
}

#[cfg(test)]
mod tests {
    use fem_proto::JsonText;

    use super::*;

    fn offer(agent: &str, tool: &str, desc: &str) -> Offer {
        Offer {
            agent: AgentId::new(agent).unwrap(),
            capabilities: vec![Capability::new(tool).unwrap()],
            tool: ToolSpec {
                name: Capability::new(tool).unwrap(),
                description: desc.into(),
                input_schema: JsonText::new(r#"{"type":"object"}"#).unwrap(),
                accepts_attested: false,
            },
        }
    }

    fn listed(named: &[Named]) -> Vec<(String, Route)> {
        named
            .iter()
            .filter(|n| n.listed)
            .map(|n| (n.name.clone(), n.route.clone()))
            .collect()
    }

    #[test]
    fn dots_become_underscores_and_agreeing_offers_are_one_tool() {
        let mut o = vec![
            offer("node-2", "shell.run", "run"),
            offer("node-1", "shell.run", "run"),
            offer("node-1", "file.read", "read"),
        ];
        let n = assign(&mut o);
        assert_eq!(
            listed(&n),
            vec![
                ("file_read".into(), Route::Capability),
                ("shell_run".into(), Route::Capability)
            ]
        );
        let shell = n.iter().find(|n| n.name == "shell_run").unwrap();
        assert_eq!(shell.offers.len(), 2);
        // Every offer has its per-agent alias.
        let aliases: Vec<_> = n.iter().filter(|n| !n.listed).map(|n| &n.name).collect();
        assert_eq!(
            aliases,
            [
                "node-1__file_read",
                "node-1__shell_run",
                "node-2__shell_run"
            ]
        );
        assert!(n.iter().all(|n| valid(&n.name)));
    }

    #[test]
    fn disagreeing_offers_are_listed_per_agent() {
        let mut o = vec![
            offer("b.example", "shell.run", "new"),
            offer("a:1", "shell.run", "old"),
        ];
        let n = assign(&mut o);
        assert_eq!(
            listed(&n),
            vec![
                (
                    "a_1__shell_run".into(),
                    Route::Agent(AgentId::new("a:1").unwrap())
                ),
                (
                    "b_example__shell_run".into(),
                    Route::Agent(AgentId::new("b.example").unwrap())
                )
            ]
        );
        // The aliases are the listed names, so not repeated.
        assert_eq!(n.len(), 2);
    }

    #[test]
    fn the_answer_does_not_depend_on_arrival_order() {
        let base = vec![
            offer("x", "a.b", "1"),
            offer("y", "a_b", "2"),
            offer("z", "a.b", "1"),
            offer("w", "c", "3"),
        ];
        let names = |mut v: Vec<Offer>| -> Vec<(String, String)> {
            assign(&mut v)
                .into_iter()
                .map(|n| (n.name, n.tool.to_string()))
                .collect()
        };
        let first = names(base.clone());
        let mut rev = base.clone();
        rev.reverse();
        assert_eq!(first, names(rev));
        let mut rot = base;
        rot.rotate_left(2);
        assert_eq!(first, names(rot));
    }

    #[test]
    fn clashing_clean_names_get_a_hash_of_what_they_name() {
        let mut o = vec![offer("x", "a.b", "1"), offer("y", "a_b", "2")];
        let n = assign(&mut o);
        let l = listed(&n);
        assert_eq!(l.len(), 2);
        assert_ne!(l[0].0, l[1].0);
        for (name, _) in &l {
            assert!(name.starts_with("a_b-") && name.len() == 12, "{name}");
            assert!(valid(name));
        }
        // The hash names the FEM tool: the same on every broker.
        assert_eq!(l[0].0, hashed("a_b", "a.b"));
    }

    #[test]
    fn long_names_are_cut_with_a_hash() {
        let long = format!("{}.{}", "a".repeat(60), "b".repeat(30));
        let mut o = vec![offer("agent", &long, "d")];
        let n = assign(&mut o);
        for x in &n {
            assert!(valid(&x.name), "{}", x.name);
            assert_eq!(x.name.len(), MAX_NAME);
        }
        assert_ne!(n[0].name, n[1].name);
    }

    #[test]
    fn validity() {
        assert!(valid("shell_run"));
        assert!(valid("a-b_C9"));
        assert!(!valid(""));
        assert!(!valid("shell.run"));
        assert!(!valid(&"a".repeat(65)));
    }
}
