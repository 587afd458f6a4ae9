//! What an operator would look at on a lab node, as text a test can diff: rules and tables
//! 100–102 of both families, the tunnels, both nft tables (one set element a line) and, for the
//! iptables backend, its rules and ipset members. A restart in place must leave it unchanged; a
//! pod's enroll or removal must change only lines naming that pod's addresses.

use crate::Lab;

/// The snapshot of node `node` (`nodeA`, `nodeB`).
pub fn node_snapshot(lab: &Lab, node: &str) -> String {
    let run = |argv: &[&str]| {
        let out = lab.exec(node, argv).expect("exec");
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    let mut s = String::new();
    for family in ["-4", "-6"] {
        s += &run(&["ip", family, "rule"]);
        for t in ["100", "101", "102"] {
            s += &format!(
                "table {t} {family}\n{}",
                run(&["ip", family, "route", "show", "table", t])
            );
        }
    }
    s += &run(&["ip", "-o", "-d", "link", "show", "istioin"]);
    s += &run(&["ip", "-o", "-d", "link", "show", "istioout"]);
    for family in ["inet", "bridge"] {
        s += &one_element_per_line(&run(&["nft", "list", "table", family, "ambient-node"]));
    }
    for save in [
        "iptables-nft-save",
        "iptables-legacy-save",
        "ip6tables-nft-save",
        "ip6tables-legacy-save",
    ] {
        for l in run(&[save])
            .lines()
            .filter(|l| l.starts_with("-A") && l.contains("AMBIENT"))
        {
            s += &format!("{save}: {l}\n");
        }
    }
    let mut members: Vec<String> = run(&["ipset", "save"])
        .lines()
        .filter(|l| l.contains("ztunnel-pods"))
        .map(str::to_string)
        .collect();
    members.sort();
    for m in members {
        s += &format!("ipset: {m}\n");
    }
    s
}

/// nft wraps a long element list over several lines, so one element more or less re-wraps its
/// neighbours' lines: one line per element instead, so a diff names exactly the elements.
pub fn one_element_per_line(nft: &str) -> String {
    let mut out = String::new();
    let mut in_elements = false;
    for line in nft.lines() {
        let t = line.trim();
        let body = match t.strip_prefix("elements = {") {
            Some(rest) => rest,
            None if in_elements => t,
            None => {
                out += line;
                out.push('\n');
                continue;
            }
        };
        let (body, last) = match body.strip_suffix('}') {
            Some(b) => (b, true),
            None => (body, false),
        };
        for e in body.split(',').map(str::trim).filter(|e| !e.is_empty()) {
            out += &format!("\t\telement {e}\n");
        }
        in_elements = !last;
    }
    out
}

/// The lines of `a` that `b` does not have.
pub fn lines_only_in(a: &str, b: &str) -> Vec<String> {
    let bl: Vec<&str> = b.lines().collect();
    a.lines()
        .filter(|l| !bl.contains(l))
        .map(str::to_string)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wrapped_elements_become_one_a_line() {
        let nft = "set s {\n\t\telements = { 10.0.0.1, 10.0.0.2,\n\t\t\t     10.0.0.3 }\n}\n";
        assert_eq!(
            one_element_per_line(nft),
            "set s {\n\t\telement 10.0.0.1\n\t\telement 10.0.0.2\n\t\telement 10.0.0.3\n}\n"
        );
        assert_eq!(lines_only_in("a\nb\nc", "b"), vec!["a", "c"]);
    }
}
