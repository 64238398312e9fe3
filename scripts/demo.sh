#!/usr/bin/env bash
# The demo: start the node on its embedded defaults (SQLite, local spool), send it a
# generated CT study with `dicom-node send`, show what it indexed, stop it cleanly.
set -euo pipefail
cd "$(dirname "$0")/.."
BIN=.venv/bin
WORK=.demo
rm -rf "$WORK"
mkdir -p "$WORK"

export DICOM_NODE_DATA_DIR="$WORK/data"
export DICOM_NODE_PORT="${DICOM_NODE_PORT:-11112}"
export DICOM_NODE_STUDY_QUIET_SECONDS="${DICOM_NODE_STUDY_QUIET_SECONDS:-3}"

echo "== generating a synthetic CT study (40 slices of 512x512)"
$BIN/dicom-node generate "$WORK/study" --modality CT --slices 40

echo "== starting the node: AE DICOMNODE on port $DICOM_NODE_PORT, data in $WORK/data"
$BIN/dicom-node serve --config config/node.toml >"$WORK/node.log" 2>&1 &
NODE_PID=$!
trap 'kill -TERM $NODE_PID 2>/dev/null || true' EXIT
for _ in $(seq 1 100); do
  $BIN/dicom-node echo 127.0.0.1 "$DICOM_NODE_PORT" --aec DICOMNODE >/dev/null 2>&1 && break
  kill -0 $NODE_PID 2>/dev/null || { cat "$WORK/node.log"; exit 1; }
  sleep 0.2
done
$BIN/dicom-node echo 127.0.0.1 "$DICOM_NODE_PORT" --aec DICOMNODE

echo "== sending the study"
$BIN/dicom-node send "$WORK/study" --to "127.0.0.1:$DICOM_NODE_PORT" --aec DICOMNODE

echo "== waiting ${DICOM_NODE_STUDY_QUIET_SECONDS}s of quiet for the study to complete"
sleep "$(( ${DICOM_NODE_STUDY_QUIET_SECONDS%.*} + 2 ))"
$BIN/dicom-node studies --config config/node.toml

echo "== stopping the node (SIGTERM)"
kill -TERM $NODE_PID
wait $NODE_PID
trap - EXIT
echo "== node log"
cat "$WORK/node.log"
