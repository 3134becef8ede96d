"""The reference path our initiator will be compared with: open-iscsi's kernel initiator against
LIO (configured with rtslib-fb) and against tgtd, yielding a real /dev/sdX that takes a file
system."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.kernel import helpers
from tests.support.targets import Chap, TargetInfo
from tests.support.tgtd import Tgtd

LioFactory = Callable[..., helpers.LioTarget]

AUTH: dict[str, Callable[[], Chap | None]] = {
    "no-chap": lambda: None,
    "one-way-chap": Chap.one_way,
    "mutual-chap": Chap.two_way,
}

# iscsiadm's exit statuses: the target refused our credentials ("iSCSI login failed due to
# authorization failure"), and a login failure the initiator will not retry (here: the target's
# mutual-CHAP response did not match).
ISCSI_ERR_LOGIN_AUTH_FAILED = 24
ISCSI_ERR_FATAL_LOGIN = 19


def assert_no_session(iscsiadm: helpers.Iscsiadm) -> None:
    assert iscsiadm.sessions() == []
    assert list(Path("/sys/class/iscsi_session").glob("session*")) == []


def use_disk_like_a_person(iscsiadm: helpers.Iscsiadm, target: TargetInfo) -> None:
    """Log in, check the disk, mkfs.ext4 + fsck -fn it, log out, check nothing is left."""
    with helpers.logged_in(iscsiadm, target) as disk:
        node = disk.device_node
        assert node is not None and node.startswith("/dev/sd")
        assert int(disk.attributes.asstring("size")) * 512 == target.size
        links = helpers.by_id_links(disk)
        assert links, f"no /dev/disk/by-id link for {node}"
        assert all(os.path.realpath(link) == node for link in links)
        helpers.run(["mkfs.ext4", "-q", "-F", node])
        helpers.run(["fsck.ext4", "-f", "-n", node])
        assert len(iscsiadm.sessions()) == 1
    assert_no_session(iscsiadm)


@pytest.mark.parametrize("auth", list(AUTH))
def test_lio_target_through_open_iscsi(
    lio_target: LioFactory, iscsiadm: helpers.Iscsiadm, auth: str
) -> None:
    target = lio_target(64 << 20, chap=AUTH[auth]())
    assert (target.portal, target.iqn) in iscsiadm.discover(target.portal)
    use_disk_like_a_person(iscsiadm, target)


def test_lio_fileio_backstore(lio_target: LioFactory, iscsiadm: helpers.Iscsiadm) -> None:
    target = lio_target(32 << 20, backstore="fileio")
    use_disk_like_a_person(iscsiadm, target)


def test_lio_acl_with_chap(lio_target: LioFactory, iscsiadm: helpers.Iscsiadm) -> None:
    """Explicit ACL for this VM's initiator name (not demo mode), CHAP on the ACL."""
    text = Path("/etc/iscsi/initiatorname.iscsi").read_text()
    name = next(
        line.split("=", 1)[1].strip()
        for line in text.splitlines()
        if line.startswith("InitiatorName=")
    )
    target = lio_target(32 << 20, chap=Chap.one_way(), initiators=[name])
    use_disk_like_a_person(iscsiadm, target)


def test_lio_refuses_wrong_chap_secret(lio_target: LioFactory, iscsiadm: helpers.Iscsiadm) -> None:
    target = lio_target(16 << 20, chap=Chap.one_way())
    assert target.chap is not None
    wrong = Chap(target.chap.userid, "0123456789abcdef")
    with pytest.raises(helpers.CommandError) as failed:
        iscsiadm.login(target, chap=wrong)
    assert failed.value.returncode == ISCSI_ERR_LOGIN_AUTH_FAILED
    assert_no_session(iscsiadm)


def test_open_iscsi_refuses_target_with_wrong_mutual_secret(
    lio_target: LioFactory, iscsiadm: helpers.Iscsiadm
) -> None:
    target = lio_target(16 << 20, chap=Chap.two_way())
    chap = target.chap
    assert chap is not None and chap.mutual_userid is not None
    wrong = Chap(chap.userid, chap.password, chap.mutual_userid, "fedcba9876543210")
    with pytest.raises(helpers.CommandError) as failed:
        iscsiadm.login(target, chap=wrong)
    assert failed.value.returncode == ISCSI_ERR_FATAL_LOGIN
    assert_no_session(iscsiadm)


@pytest.mark.parametrize("auth", ["no-chap", "mutual-chap"])
def test_tgtd_target_through_open_iscsi(
    tgtd: Tgtd, iscsiadm: helpers.Iscsiadm, auth: str
) -> None:
    target = tgtd.add_target(64 << 20, chap=AUTH[auth]())
    assert (target.portal, target.iqn) in iscsiadm.discover(target.portal)
    use_disk_like_a_person(iscsiadm, target)


def test_lio_target_info_is_enough_for_an_initiator(lio_target: LioFactory) -> None:
    """What hbactl (or libiscsi) will get: portal, IQN, LUN and CHAP in one URL."""
    chap = Chap.two_way()
    target = lio_target(8 << 20, chap=chap, port=3261, lun=0)
    assert target.url() == (
        f"iscsi://{chap.userid}%{chap.password}@127.0.0.1:3261/{target.iqn}/0"
        f"?target_user={chap.mutual_userid}&target_password={chap.mutual_password}"
    )
    assert target.url(credentials=False) == f"iscsi://127.0.0.1:3261/{target.iqn}/0"
    portal = helpers.CONFIGFS_TARGET / "iscsi" / target.iqn / "tpgt_1" / "np" / "127.0.0.1:3261"
    assert portal.is_dir()
