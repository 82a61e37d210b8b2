#!/bin/bash
# mnist-cloud: install the autostop watchdog (idempotent)
set -e
ROOT="${MNIST_CLOUD_ROOT:-}"
mkdir -p "$ROOT/etc/mnist-cloud" "$ROOT/var/lib/mnist-cloud" "$ROOT/usr/local/bin" "$ROOT/var/log"
@@{autostop_script}cat > "$ROOT/etc/mnist-cloud/autostop.json" <<'MNIST_CLOUD_CONFIG'
@@{config}
MNIST_CLOUD_CONFIG
rm -f "$ROOT/var/lib/mnist-cloud/autostop-state.json"  # the idle clock starts now
if [ -z "$ROOT" ] && command -v systemctl >/dev/null 2>&1 && [ -d /run/systemd/system ]; then
mkdir -p "$ROOT/etc/systemd/system"
@@{units}systemctl daemon-reload
systemctl enable --now mnist-cloud-autostop.timer >/dev/null 2>&1
echo "mnist-cloud autostop: systemd timer installed (@@{tag})"
else
mkdir -p "$ROOT/etc/cron.d"
echo "* * * * * root MNIST_CLOUD_ROOT=$ROOT /usr/bin/python3 $ROOT/usr/local/bin/mnist-cloud-autostop >> $ROOT/var/log/mnist-cloud-autostop.log 2>&1" > "$ROOT/etc/cron.d/mnist-cloud-autostop"
echo "mnist-cloud autostop: cron entry installed (@@{tag})"
fi
@@{resume_agent}