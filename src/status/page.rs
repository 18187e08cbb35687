//! The status page (`/`), rendered on the server from a [`Status`] so that it is complete
//! without JavaScript (and a headless browser's dumped DOM has everything). Elements carry
//! stable ids, classes and `data-` attributes for tests and scripts.

use std::fmt::Write as _;

use super::html::{bytes, duration, escape, page, verdict, with_code};
use super::model::{NodeStatus, Severity, Status, VirtualStorageStatus};

/// Seconds between reloads of the page in a browser.
pub const REFRESH_SECONDS: u32 = 10;

/// The page for `status`.
pub fn render(status: &Status) -> String {
    let mut body = String::new();
    let state = if status.summary.ok { "ok" } else { "problem" };
    let _ = write!(
        body,
        "<header><h1>Praefect status &mdash; {name}</h1>\
         <p id=\"summary\" class=\"summary {state}\" data-state=\"{state}\">{text}</p></header><main>",
        name = escape(&status.router.name),
        text = escape(&status.summary.text),
    );
    problems(&mut body, status);
    for vs in &status.virtual_storages {
        virtual_storage(&mut body, vs);
    }
    router(&mut body, status);
    recent_errors(&mut body, status);
    lookup_form(&mut body, status);
    let _ = write!(
        body,
        "</main><footer>Collected {at}; kept a few seconds, repository counts longer. \
         <label><input type=\"checkbox\" id=\"autorefresh\" checked> reload every {REFRESH_SECONDS}s</label> \
         &middot; <a href=\"status.json\">status.json</a> &middot; <a href=\"metrics\">metrics</a> \
         &middot; <a href=\"db_metrics\">db_metrics</a></footer>",
        at = escape(&status.collected_at),
    );
    page("Praefect status", &body, Some(REFRESH_SECONDS))
}

fn problems(body: &mut String, status: &Status) {
    if status.problems.is_empty() {
        return;
    }
    body.push_str(
        "<section id=\"problems\"><h2>Problems and what to do</h2><ul class=\"problems\">",
    );
    for problem in &status.problems {
        let severity = match problem.severity {
            Severity::Critical => "critical",
            Severity::Warning => "warning",
        };
        let _ = write!(
            body,
            "<li class=\"problem {severity}\" data-kind=\"{kind}\" data-severity=\"{severity}\">\
             <strong>{what}</strong><span class=\"action\">What to do: {action}</span></li>",
            kind = problem.kind,
            what = escape(&problem.what),
            action = with_code(&problem.action),
        );
    }
    body.push_str("</ul></section>");
}

fn virtual_storage(body: &mut String, vs: &VirtualStorageStatus) {
    let name = escape(&vs.name);
    let _ = write!(
        body,
        "<section class=\"virtual-storage\" data-virtual-storage=\"{name}\">\
         <h2>Virtual storage {name}</h2><div class=\"grid\">"
    );
    nodes(body, vs);
    repositories(body, vs);
    queue(body, vs);
    verification(body, vs);
    body.push_str("</div></section>");
}

fn nodes(body: &mut String, vs: &VirtualStorageStatus) {
    let _ = write!(
        body,
        "<div class=\"card full\"><h3>Nodes</h3><p class=\"muted\">Quorum: healthy for at least \
         {} of the {} active router{}.</p><div class=\"scroll\"><table class=\"nodes\"><tr>\
         <th>storage</th><th>this router</th><th>quorum</th><th>other routers</th><th>disk</th></tr>",
        vs.quorum_needed,
        vs.active_routers,
        if vs.active_routers == 1 { "" } else { "s" }
    );
    for node in &vs.nodes {
        node_row(body, node);
    }
    body.push_str("</table></div></div>");
}

fn node_row(body: &mut String, node: &NodeStatus) {
    let quorum = match node.quorum_healthy {
        Some(q) => verdict(q, "healthy", "unhealthy"),
        None => "<span class=\"muted\">unknown</span>".to_string(),
    };
    let others: Vec<String> = node
        .seen_by
        .iter()
        .filter(|v| !v.this_router)
        .map(|v| {
            format!(
                "<span title=\"{name}\" data-router=\"{name}\">{}</span>",
                verdict(v.healthy, "healthy", "unhealthy"),
                name = escape(&v.praefect_name)
            )
        })
        .collect();
    let others = if others.is_empty() {
        "<span class=\"muted\">none</span>".to_string()
    } else {
        others.join(" ")
    };
    let disk = match (&node.disk, &node.disk_error) {
        (Some(disk), _) => format!(
            "<div class=\"bar\" title=\"{pct:.0}% used\"><span style=\"width:{pct:.0}%\"></span></div>\
             <span class=\"muted\">{} free of {}</span>",
            bytes(disk.available_bytes),
            bytes(disk.available_bytes.saturating_add(disk.used_bytes)),
            pct = disk.used_percent()
        ),
        (None, Some(err)) => format!("<span class=\"muted\" title=\"{}\">unknown</span>", escape(err)),
        (None, None) => "<span class=\"muted\">unknown</span>".to_string(),
    };
    let _ = write!(
        body,
        "<tr class=\"node\" data-storage=\"{storage}\" data-healthy=\"{healthy}\" \
         data-healthy-here=\"{here}\" data-quorum-healthy=\"{quorum_attr}\">\
         <td><strong>{storage}</strong><br><span class=\"muted\">{address}</span></td>\
         <td>{here_cell}</td><td>{quorum}</td><td class=\"wrap\">{others}</td><td>{disk}</td></tr>",
        storage = escape(&node.storage),
        address = escape(&node.address),
        healthy = !node.unhealthy(),
        here = node.healthy_here,
        quorum_attr = node
            .quorum_healthy
            .map_or("unknown".to_string(), |q| q.to_string()),
        here_cell = verdict(node.healthy_here, "healthy", "unhealthy"),
    );
}

fn repositories(body: &mut String, vs: &VirtualStorageStatus) {
    body.push_str("<div class=\"card\"><h3>Repositories</h3>");
    match (&vs.repositories, &vs.repository_counts_error) {
        (Some(c), _) => {
            let cell = |key: &str, label: &str, n: i64, bad: &str| {
                let class = if n > 0 { bad } else { "" };
                format!(
                    "<tr><td>{label}</td><td class=\"num {class}\" data-count=\"{key}\">{n}</td></tr>"
                )
            };
            let _ = write!(
                body,
                "<table class=\"repositories\" data-total=\"{}\">{}{}{}{}{}</table>\
                 <p class=\"muted\">{} replicas; counted {} ago.</p>",
                c.repositories,
                cell("total", "total", c.repositories, ""),
                cell("healthy", "healthy", c.healthy, "good"),
                cell("outdated", "outdated replicas", c.outdated, "warnv"),
                cell(
                    "unavailable",
                    "unavailable (no valid primary)",
                    c.unavailable,
                    "badv"
                ),
                cell("read_only", "read-only", c.read_only, "badv"),
                c.replicas,
                duration(vs.repository_counts_age_seconds.unwrap_or(0) as f64),
            );
        }
        (None, Some(err)) => {
            let _ = write!(
                body,
                "<p class=\"badv\" id=\"repository-counts-error\">Could not count: {}</p>",
                escape(err)
            );
        }
        (None, None) => body.push_str("<p class=\"muted\">unknown</p>"),
    }
    body.push_str("</div>");
}

fn queue(body: &mut String, vs: &VirtualStorageStatus) {
    body.push_str("<div class=\"card\"><h3>Replication queue</h3>");
    if vs.queue.is_empty() {
        body.push_str("<p class=\"good queue-empty\">Empty: every replica is caught up.</p></div>");
        return;
    }
    body.push_str(
        "<div class=\"scroll\"><table class=\"queue\"><tr><th>target</th><th class=\"num\">jobs</th>\
         <th>by state</th><th>oldest</th></tr>",
    );
    for target in &vs.queue {
        let states: Vec<String> = target
            .states
            .iter()
            .map(|s| {
                format!(
                    "<span class=\"queue-state\" data-state=\"{state}\" data-count=\"{count}\">{state}: {count}</span>",
                    state = escape(&s.state),
                    count = s.count
                )
            })
            .collect();
        let _ = write!(
            body,
            "<tr class=\"queue-target\" data-target=\"{target}\" data-total=\"{total}\" \
             data-oldest-seconds=\"{oldest:.0}\"><td>{target}</td><td class=\"num\">{total}</td>\
             <td class=\"wrap\">{states}</td><td>{age}</td></tr>",
            target = escape(&target.target),
            total = target.total,
            oldest = target.oldest_seconds,
            states = states.join(", "),
            age = duration(target.oldest_seconds),
        );
    }
    body.push_str("</table></div></div>");
}

fn verification(body: &mut String, vs: &VirtualStorageStatus) {
    let v = &vs.verification;
    body.push_str("<div class=\"card verification\"><h3>Verification</h3>");
    if !v.enabled {
        body.push_str(
            "<p class=\"muted\">Disabled (<code>verification_interval = 0</code>).</p></div>",
        );
        return;
    }
    let n = |x: Option<i64>| x.map_or("?".to_string(), |x| x.to_string());
    let _ = write!(
        body,
        "<dl class=\"kv\"><dt>interval</dt><dd>{}</dd>\
         <dt>verified within it</dt><dd data-count=\"verified\">{}</dd>\
         <dt>expired</dt><dd data-count=\"expired\">{}</dd>\
         <dt>never verified</dt><dd data-count=\"unverified\">{}</dd>\
         <dt>failing (this router)</dt><dd data-count=\"failing\">{} missing, {} errors</dd></dl></div>",
        duration(v.interval_seconds as f64),
        n(v.verified),
        n(v.expired),
        n(v.unverified),
        v.failing_invalid,
        v.failing_errors,
    );
}

fn router(body: &mut String, status: &Status) {
    let r = &status.router;
    let writer = match (&r.database_writer, &r.database_writer_lost) {
        (Some(target), _) => format!("<span class=\"good\">{}</span>", escape(target)),
        (None, reason) => format!(
            "<span class=\"badv\">none: {}</span>",
            escape(reason.as_deref().unwrap_or("unknown"))
        ),
    };
    let listen = if r.listen_connected {
        "<span class=\"good\">connected</span>".to_string()
    } else {
        format!(
            "<span class=\"badv\">down{}</span>",
            r.listen_down_seconds
                .map(|s| format!(" for {}", duration(s as f64)))
                .unwrap_or_default()
        )
    };
    let _ = write!(
        body,
        "<section id=\"router\"><h2>This router</h2><div class=\"card\"><dl class=\"kv\">\
         <dt>name</dt><dd>{name}</dd><dt>version</dt><dd>{version}</dd>\
         <dt>uptime</dt><dd>{uptime}</dd><dt>database writer</dt><dd id=\"database-writer\">{writer}</dd>\
         <dt>LISTEN (read cache)</dt><dd id=\"listen-state\">{listen}</dd></dl></div></section>",
        name = escape(&r.name),
        version = escape(&r.version),
        uptime = duration(r.uptime_seconds as f64),
    );
}

fn recent_errors(body: &mut String, status: &Status) {
    body.push_str("<section id=\"recent-errors\"><h2>Last errors</h2>");
    if status.recent_errors.is_empty() {
        body.push_str("<p class=\"muted\">None since the router started.</p></section>");
        return;
    }
    body.push_str(
        "<div class=\"scroll\"><table><tr><th>time</th><th>level</th><th>message</th></tr>",
    );
    for e in &status.recent_errors {
        let _ = write!(
            body,
            "<tr class=\"logged-error\"><td>{}</td><td>{}</td><td class=\"wrap\">{}</td></tr>",
            escape(&e.time),
            escape(&e.level),
            escape(&e.message)
        );
    }
    body.push_str("</table></div></section>");
}

fn lookup_form(body: &mut String, status: &Status) {
    let first = status
        .virtual_storages
        .first()
        .map(|vs| vs.name.clone())
        .unwrap_or_default();
    let _ = write!(
        body,
        "<section id=\"lookup\"><h2>A repository</h2><form class=\"lookup\" action=\"repository\" method=\"get\">\
         <input name=\"virtual_storage\" placeholder=\"virtual storage\" value=\"{}\">\
         <input name=\"relative_path\" placeholder=\"relative path\" size=\"40\">\
         <button type=\"submit\">Show</button></form></section>",
        escape(&first)
    );
}
