//! The delegation graph as SVG: principals in the first column, then each agent in the column
//! of its depth in the chains it is part of; one arrow per grant, labelled with its scopes and
//! expiry. Drawn here so that the page needs no script and nothing from elsewhere.

use std::collections::HashMap;

use agentd_proto::admin as pb;
use maud::{html, Markup};

const COL_WIDTH: i64 = 360;
const ROW_HEIGHT: i64 = 110;
const BOX_WIDTH: i64 = 250;
const BOX_HEIGHT: i64 = 44;
const MARGIN: i64 = 30;
/// Characters of a name a box shows (the whole name is its tooltip).
const NAME_CHARS: usize = 34;

/// One box: a principal or an agent.
#[derive(Debug)]
struct Vertex {
    name: String,
    principal: bool,
    column: usize,
    row: usize,
}

/// One arrow: a grant from `from` (principal, or the agent it was delegated by) to `to`.
#[derive(Debug)]
struct Edge<'a> {
    from: usize,
    to: usize,
    grant: &'a pb::Grant,
}

fn short(name: &str) -> String {
    let shown = name.strip_prefix("spiffe://").unwrap_or(name);
    if shown.chars().count() <= NAME_CHARS {
        shown.to_string()
    } else {
        let tail: String = shown
            .chars()
            .rev()
            .take(NAME_CHARS - 1)
            .collect::<Vec<_>>()
            .into_iter()
            .rev()
            .collect();
        format!("…{tail}")
    }
}

fn remaining(expires_at: i64, now: i64) -> String {
    let s = expires_at - now;
    if s <= 0 {
        "expired".into()
    } else if s < 3600 {
        format!("{}m left", (s + 59) / 60)
    } else if s < 48 * 3600 {
        format!("{}h left", s / 3600)
    } else {
        format!("{}d left", s / 86_400)
    }
}

fn layout(grants: &[pb::Grant]) -> (Vec<Vertex>, Vec<Edge<'_>>) {
    let mut vertices: Vec<Vertex> = Vec::new();
    let mut index: HashMap<(bool, String), usize> = HashMap::new();
    let mut vertex = |vertices: &mut Vec<Vertex>, name: &str, principal: bool, column: usize| {
        let key = (principal, name.to_string());
        match index.get(&key) {
            Some(&i) => {
                let v: &mut Vertex = &mut vertices[i];
                v.column = v.column.max(column);
                i
            }
            None => {
                vertices.push(Vertex {
                    name: name.to_string(),
                    principal,
                    column,
                    row: 0,
                });
                index.insert(key, vertices.len() - 1);
                vertices.len() - 1
            }
        }
    };
    let mut edges = Vec::new();
    for g in grants {
        let depth = g.chain.len().max(1);
        let from = if depth == 1 {
            vertex(&mut vertices, &g.principal, true, 0)
        } else {
            let by = &g.chain[depth - 2].agent;
            vertex(&mut vertices, by, false, depth - 1)
        };
        let to = vertex(&mut vertices, &g.agent, false, depth);
        edges.push(Edge { from, to, grant: g });
    }
    let mut rows: HashMap<usize, usize> = HashMap::new();
    for v in &mut vertices {
        let r = rows.entry(v.column).or_default();
        v.row = *r;
        *r += 1;
    }
    (vertices, edges)
}

fn position(v: &Vertex) -> (i64, i64) {
    (
        MARGIN + v.column as i64 * COL_WIDTH,
        MARGIN + v.row as i64 * ROW_HEIGHT,
    )
}

/// The graph of `grants`; agents with an entry link to their page.
pub fn draw(grants: &[pb::Grant], entry_of: &HashMap<&str, &str>, now: i64) -> Markup {
    if grants.is_empty() {
        return html! { p.none { "No live grants: nobody has delegated to an agent." } };
    }
    let (vertices, edges) = layout(grants);
    let columns = vertices.iter().map(|v| v.column).max().unwrap_or(0) as i64 + 1;
    let rows = vertices.iter().map(|v| v.row).max().unwrap_or(0) as i64 + 1;
    let width = 2 * MARGIN + (columns - 1) * COL_WIDTH + BOX_WIDTH;
    let height = 2 * MARGIN + (rows - 1) * ROW_HEIGHT + BOX_HEIGHT;
    html! {
        svg xmlns="http://www.w3.org/2000/svg" id="delegation-graph" width=(width) height=(height)
            viewBox={"0 0 " (width) " " (height)} role="img" aria-label="delegation graph" {
            defs {
                marker id="arrow" viewBox="0 0 10 10" refX="10" refY="5" markerWidth="8"
                    markerHeight="8" orient="auto-start-reverse" {
                    path d="M 0 0 L 10 5 L 0 10 z" fill="#555" {}
                }
            }
            @for e in &edges {
                @let (fx, fy) = position(&vertices[e.from]);
                @let (tx, ty) = position(&vertices[e.to]);
                @let (x1, y1) = (fx + BOX_WIDTH, fy + BOX_HEIGHT / 2);
                @let (x2, y2) = (tx, ty + BOX_HEIGHT / 2);
                g.edge data-grant=(e.grant.id) data-from=(vertices[e.from].name) data-to=(vertices[e.to].name) {
                    title { "grant " (e.grant.id) ": " (e.grant.scopes.join(" ")) " until " (crate::cli::output::rfc3339(e.grant.expires_at)) }
                    path d={"M " (x1) " " (y1) " C " ((x1 + x2) / 2) " " (y1) ", " ((x1 + x2) / 2) " " (y2) ", " (x2) " " (y2)}
                        fill="none" stroke="#555" stroke-width="1.5" marker-end="url(#arrow)" {}
                    text.edge-label x=((x1 + x2) / 2) y=((y1 + y2) / 2 - 8) text-anchor="middle" {
                        (e.grant.scopes.join(" "))
                    }
                    text.edge-expiry x=((x1 + x2) / 2) y=((y1 + y2) / 2 + 18) text-anchor="middle" {
                        (remaining(e.grant.expires_at, now))
                        @if !e.grant.task_id.is_empty() { " · task " (e.grant.task_id) }
                    }
                }
            }
            @for v in &vertices {
                @let (x, y) = position(v);
                @let kind = if v.principal { "principal" } else { "agent" };
                @let body = html! {
                    title { (v.name) }
                    rect x=(x) y=(y) width=(BOX_WIDTH) height=(BOX_HEIGHT) rx="8"
                        fill=(if v.principal { "#fdf3e1" } else { "#e8f0fe" })
                        stroke=(if v.principal { "#c98a1b" } else { "#3b6fd8" }) {}
                    text x=(x + 10) y=(y + 27) { (short(&v.name)) }
                };
                @match entry_of.get(v.name.as_str()).filter(|_| !v.principal) {
                    Some(id) => {
                        a href={"/agent/" (id)} class={"vertex " (kind)} data-name=(v.name) { (body) }
                    }
                    None => {
                        g class={"vertex " (kind)} data-name=(v.name) { (body) }
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn grant(id: &str, principal: &str, chain: &[&str]) -> pb::Grant {
        pb::Grant {
            id: id.into(),
            principal: principal.into(),
            agent: chain.last().map(|s| s.to_string()).unwrap_or_default(),
            scopes: vec!["calendar:read".into()],
            expires_at: 7_200,
            chain: chain
                .iter()
                .map(|a| pb::GrantHop {
                    agent: a.to_string(),
                    grant_id: id.into(),
                })
                .collect(),
            ..Default::default()
        }
    }

    #[test]
    fn a_chain_is_drawn_left_to_right_with_one_arrow_per_grant() {
        let grants = [
            grant("g1", "user:alice", &["spiffe://td/orch"]),
            grant(
                "g2",
                "user:alice",
                &["spiffe://td/orch", "spiffe://td/sched"],
            ),
        ];
        let (v, e) = layout(&grants);
        let col = |n: &str| v.iter().find(|x| x.name == n).map(|x| x.column);
        assert_eq!(col("user:alice"), Some(0));
        assert_eq!(col("spiffe://td/orch"), Some(1));
        assert_eq!(col("spiffe://td/sched"), Some(2));
        assert_eq!(e.len(), 2);
        assert_eq!(v[e[1].from].name, "spiffe://td/orch");
        let entries = HashMap::from([("spiffe://td/sched", "e1")]);
        let svg = draw(&grants, &entries, 0).into_string();
        assert!(svg.contains("href=\"/agent/e1\""), "{svg}");
        assert!(svg.contains("2h left"), "{svg}");
        // In HTML, an SVG element is closed only by its end tag (or `/>`): a bare `<rect>`
        // would swallow the label after it, which then is not drawn.
        for void in ["<rect", "<path"] {
            assert_eq!(
                svg.matches(void).count(),
                svg.matches(&format!("</{}>", &void[1..])).count(),
                "{void} without its end tag: {svg}"
            );
        }
    }

    #[test]
    fn long_names_keep_their_end() {
        let s = short("spiffe://example.org/a/very/long/path/to/the/scheduler-agent");
        assert!(s.starts_with('…') && s.ends_with("scheduler-agent"), "{s}");
        assert_eq!(s.chars().count(), NAME_CHARS);
    }
}
