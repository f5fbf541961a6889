"""Packaging for gbalance; the version is read from gbalance/__init__.py."""

import re
from pathlib import Path

from setuptools import setup

HERE = Path(__file__).parent
VERSION = re.search(r'__version__ = "([^"]+)"', (HERE / "gbalance" / "__init__.py").read_text()).group(1)

setup(
    name="gbalance",
    version=VERSION,
    description="balance, the load-balancing TCP proxy with failover and a live control shell, on gevent",
    long_description=(HERE / "README").read_text(encoding="utf-8"),
    long_description_content_type="text/plain",
    license="GPL-2.0-or-later",
    packages=["gbalance"],
    python_requires=">=3.11",
    # Ranges that admit both PyPI's releases and Debian bookworm's packages
    # (python3-gevent 22.10.2, python3-docopt 0.6.2).
    install_requires=["gevent>=22.10.2", "docopt>=0.6.2,<0.7"],
    entry_points={"console_scripts": ["balance = gbalance.cli:main"]},
    classifiers=[
        "License :: OSI Approved :: GNU General Public License v2 or later (GPLv2+)",
        "Operating System :: POSIX :: Linux",
        "Programming Language :: Python :: 3",
        "Topic :: System :: Networking",
    ],
)
