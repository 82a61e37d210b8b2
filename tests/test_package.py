"""The built package, not the checkout: a wheel carries the on-instance agents (autostop, the spot
watcher, the resume agent) and their systemd units, and a non-editable install of it launches with
autostop on, from a directory that is not a checkout."""

from __future__ import annotations

import base64
import gzip
import os
import subprocess
import sys

from fixtures.aws import aws_env, moto_server, seed_dlami


def test_a_wheel_install_launches_with_autostop_on(installed_wheel, tmp_path):
    """Before the agents were package data (they were scripts/*.py), this launch failed: no wheel had them."""
    with moto_server() as endpoint:
        seed_dlami()
        env = {**os.environ, **aws_env(tmp_path, AWS_ENDPOINT_URL=endpoint), "PYTHONPATH": str(installed_wheel)}
        proc = subprocess.run([sys.executable, "-m", "infra.commands", "launch", "--instance", "g4dn.xlarge", "--name",
                               "wheel", "--ssh-cidr", "192.0.2.1/32", "--no-wait-ssh", "--spot"],
                              capture_output=True, text=True, cwd=tmp_path, env=env, timeout=300, check=False)
        where = subprocess.run([sys.executable, "-c", "import infra; print(infra.__file__)"], capture_output=True,
                               text=True, cwd=tmp_path, env=env, check=False)
        # the wheel's code, not the checkout's
        assert where.stdout.strip().startswith(str(installed_wheel)), where.stdout
        assert proc.returncode == 0, proc.stderr
        import boto3

        ec2 = boto3.client("ec2", endpoint_url=endpoint, region_name="us-east-1", aws_access_key_id="t",
                           aws_secret_access_key="t")
        instance = ec2.describe_instances()["Reservations"][0]["Instances"][0]["InstanceId"]
        data = ec2.describe_instance_attribute(InstanceId=instance, Attribute="userData")["UserData"]["Value"]
    script = gzip.decompress(base64.b64decode(data)).decode()  # the user data is gzipped whole
    # the installer carries each agent exactly as the package holds it
    agents = {block.split("\n", 1)[1].split("MNIST_CLOUD_SCRIPT")[0]
              for block in script.split("<<'MNIST_CLOUD_SCRIPT'")[1:]}
    assert agents == {(installed_wheel / "infra" / "agent" / name).read_text()
                      for name in ("autostop.py", "resume_agent.py", "notify.py")}
    assert "mnist-cloud-autostop.timer" in script and "OnUnitActiveSec=1min" in script
