"""The README's libvirt snippet, validated against libvirt's own schema.

The snippet is a fragment (features, devices, memory backing): it is put into the
smallest q35 domain and checked with ``virt-xml-validate`` from Debian's
libvirt-clients (which needs xmllint, libxml2-utils). The schema cannot say that
``intremap='on'`` needs the split I/O APIC (libvirt's QEMU driver refuses that at
define time), so that rule is checked here by hand.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

from tests.lab.fixtures import require_binary

README = Path(__file__).resolve().parent.parent / "README.md"

DOMAIN = """<domain type='kvm'>
  <name>vm1</name>
  <memory unit='GiB'>2</memory>
  <os>
    <type arch='x86_64' machine='q35'>hvm</type>
  </os>
{snippet}
</domain>
"""


def libvirt_snippet() -> str:
    """The first ```xml block under "### libvirt"."""
    text = README.read_text()
    section = text[text.index("\n### libvirt\n") :]
    match = re.search(r"```xml\n(.*?)```", section, re.S)
    assert match is not None, "no ```xml block in the libvirt section"
    return match.group(1)


def validate(xml: str, tmp_path: Path) -> subprocess.CompletedProcess[str]:
    require_binary("virt-xml-validate", "libvirt-clients")
    require_binary("xmllint", "libxml2-utils")
    path = tmp_path / "domain.xml"
    path.write_text(xml)
    return subprocess.run(
        [shutil.which("virt-xml-validate") or "virt-xml-validate", str(path), "domain"],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip


def test_libvirt_snippet_validates(tmp_path: Path) -> None:
    done = validate(DOMAIN.format(snippet=libvirt_snippet()), tmp_path)
    assert done.returncode == 0, done.stdout + done.stderr
    assert (done.stdout + done.stderr).strip().endswith("validates"), done


def test_the_validator_can_fail(tmp_path: Path) -> None:
    """A misspelt attribute fails, so a pass above means something."""
    broken = libvirt_snippet().replace("intremap=", "intremapping=")
    done = validate(DOMAIN.format(snippet=broken), tmp_path)
    assert done.returncode != 0, done.stdout + done.stderr
    assert "fails to validate" in done.stderr, done.stderr


def test_libvirt_snippet_has_what_the_schema_cannot_check() -> None:
    """libvirt: "IOMMU interrupt remapping requires split I/O APIC (ioapic driver='qemu')"."""
    root = ET.fromstring(f"<domain>{libvirt_snippet()}</domain>")
    iommu = root.find("devices/iommu")
    assert iommu is not None and iommu.get("model") == "intel"
    driver = iommu.find("driver")
    assert driver is not None
    if driver.get("intremap") == "on":
        ioapic = root.find("features/ioapic")
        assert ioapic is not None and ioapic.get("driver") == "qemu"
    assert driver.get("iotlb") == "on"  # device-iotlb: what ats='on' needs
    interface = root.find("devices/interface[@type='vhostuser']")
    assert interface is not None
    nic = interface.find("driver")
    assert nic is not None and (nic.get("iommu"), nic.get("ats")) == ("on", "on")
    source = interface.find("source")
    assert source is not None and source.get("mode") == "client"
    access = root.find("memoryBacking/access")
    assert access is not None and access.get("mode") == "shared"  # vhost-user needs it


@pytest.mark.parametrize("text", ["intremap='on'", "<ioapic driver='qemu'/>"])
def test_readme_says_it(text: str) -> None:
    assert text in libvirt_snippet()
