//! What `ctl status` prints of a disk's N-version Tee: one line per member.

use serde_json::Value;

/// The member lines of disk status `d` (empty without a voting Tee), each starting with a
/// line break.
pub fn members(d: &Value) -> String {
    let Some(v) = d.get("voting").filter(|v| !v.is_null()) else {
        return String::new();
    };
    let name = d.get("name").and_then(Value::as_str).unwrap_or("?");
    let n = |m: &Value, k: &str| m.get(k).and_then(Value::as_u64).unwrap_or(0);
    let t = |m: &Value, k: &str| m.get(k).and_then(Value::as_str).unwrap_or("").to_string();
    let c = v.get("counters").cloned().unwrap_or(Value::Null);
    let mut out = format!(
        "\ndisk {name}: voting tee, policy {}: {} blocks voted, {} votes lost, {} repaired, {} \
         with no majority",
        t(v, "policy"),
        n(&c, "blocks_voted"),
        n(&c, "votes_lost"),
        n(&c, "repairs"),
        n(&c, "no_majority")
    );
    let empty = Vec::new();
    for m in v.get("members").and_then(Value::as_array).unwrap_or(&empty) {
        out.push_str(&format!(
            "\n  member {} {}: version {} ({}), {}{}, holds {} blocks, {} votes lost, {} \
             repaired, {} errors",
            n(m, "member"),
            t(m, "role"),
            n(m, "version"),
            t(m, "layout"),
            t(m, "state"),
            if m.get("faulty").and_then(Value::as_bool) == Some(true) {
                ", injecting faults"
            } else {
                ""
            },
            n(m, "held_blocks"),
            n(m, "votes_lost"),
            n(m, "repairs"),
            n(m, "errors")
        ));
    }
    let disputed = v
        .get("disputed_blocks")
        .and_then(Value::as_array)
        .map_or(0, Vec::len);
    if disputed > 0 {
        out.push_str(&format!(
            "\n  {disputed} block(s) disputed (no majority: the trusted member's data was returned)"
        ));
    }
    out
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    #[test]
    fn a_member_line_names_its_version_state_and_counts() {
        let d = json!({"name": "vd", "voting": {"policy": "sync-read-checks",
            "counters": {"blocks_voted": 9, "votes_lost": 3, "repairs": 2, "no_majority": 1},
            "disputed_blocks": [7],
            "members": [{"member": 1, "role": "candidate", "version": 4, "layout": "parallax-v2",
                "state": "quarantined", "faulty": true, "held_blocks": 10, "votes_lost": 3,
                "repairs": 2, "errors": 0}]}});
        let text = super::members(&d);
        assert!(text.contains("9 blocks voted, 3 votes lost, 2 repaired, 1 with no majority"));
        assert!(text.contains(
            "member 1 candidate: version 4 (parallax-v2), quarantined, injecting faults, \
             holds 10 blocks, 3 votes lost, 2 repaired, 0 errors"
        ));
        assert!(text.contains("1 block(s) disputed"));
        assert_eq!(super::members(&json!({"name": "vd"})), "");
    }
}
