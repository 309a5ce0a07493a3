#!/usr/bin/env bash
# Screenshot of the Dagster asset graph, taken by headless Chromium against a real `dagster dev`.
#   scripts/dagster_screenshot.sh [output.png]       (needs `chromium`: apt-get install chromium)
# Starts `dagster dev` on a free loopback port, waits for it, captures the global asset graph,
# and stops the server by its own process group.
set -euo pipefail
set -m
cd "$(dirname "$0")/.."
out="${1:-docs/asset_graph.png}"
port=$(.venv/bin/python -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
home=$(mktemp -d)
printf 'telemetry:\n  enabled: false\n' > "$home/dagster.yaml"
DAGSTER_HOME="$home" .venv/bin/dagster dev -w workspace.yaml -h 127.0.0.1 -p "$port" > "$home/dev.log" 2>&1 &
pid=$!
trap 'kill -TERM -- -$pid 2>/dev/null || true; wait $pid 2>/dev/null || true; rm -rf "$home"' EXIT
for _ in $(seq 1 120); do
  if curl -sf "http://127.0.0.1:$port/server_info" > /dev/null; then break; fi
  sleep 1
done
curl -sf "http://127.0.0.1:$port/server_info" > /dev/null || { tail -20 "$home/dev.log"; exit 1; }
sleep 5   # the code location loads after the webserver answers
# Dismiss the first-visit community dialog, then expand every asset group of the lineage graph
# (groups off screen are not rendered: expand what is visible, reload to re-fit, repeat).
expand="(async () => { const done = JSON.parse(sessionStorage.getItem('expanded') || '[]');
  for (const name of ['data', 'vision', 'teacher', 'model', 'evaluation', 'registry']) { if (done.includes(name)) continue;
  const el = [...document.querySelectorAll('svg foreignObject *')].find(e => e.textContent.trim() === name && !e.children.length);
  if (el) { el.click(); done.push(name); await new Promise(r => setTimeout(r, 1000)); } }
  sessionStorage.setItem('expanded', JSON.stringify(done)); return done.join(','); })()"
.venv/bin/python scripts/cdp_screenshot.py "http://127.0.0.1:$port/asset-groups" "$out" --wait 10 \
  --js "(() => { const b = [...document.querySelectorAll('button')].find(x => x.textContent.trim() === 'Skip'); if (b) b.click(); return !!b; })()" \
  --js "$expand" --js "location.reload()" --js "$expand" --js "location.reload()"
echo "wrote $out"
