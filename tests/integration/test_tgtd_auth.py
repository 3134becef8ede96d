"""Login against tgtd: no authentication, one-way and mutual CHAP, and every way it fails.

tgt speaks CHAP with MD5 (CHAP_A=5) and with SHA-1 under the number 7, which IANA gives
SHA-256 (tgt usr/iscsi/chap.c). With the IANA numbers the initiator uses, MD5 is therefore the
one algorithm both understand alike; the tests below show that it works and that offering
SHA-256 (7) first breaks the login, which is why the initiator offers MD5 alone by default.
"""

from __future__ import annotations

import json
from collections.abc import Callable

import pytest

from initiator.chap import ChapAlgorithm
from initiator.client import ScsiClient
from initiator.errors import AuthenticationError, ISCSIError
from initiator.login import LoginAuthenticationError, LoginError
from initiator.transport import Session
from tests.integration.helpers import (
    assert_no_secrets,
    assert_ok,
    assert_one_line_error,
    chap_credentials,
    hbactl,
    logged_in,
    portal_of,
    session_config,
)
from tests.support.targets import Chap
from tests.support.tgtd import TgtdTarget

MakeTarget = Callable[..., TgtdTarget]
NewChap = Callable[..., Chap]


def _secrets(chap: Chap) -> list[str | None]:
    return [chap.password, chap.mutual_password]


async def _capacity_blocks(session: Session, target: TgtdTarget) -> int:
    return (await ScsiClient(session, target.lun).capacity()).blocks


async def test_login_without_authentication(target: TgtdTarget) -> None:
    async with logged_in(target) as session:
        assert session.parameters is not None
        assert session.parameters.auth_method == "None"
        assert await _capacity_blocks(session, target) == target.size // 512


@pytest.mark.parametrize("mutual", [False, True], ids=["one-way", "mutual"])
async def test_chap_library(make_target: MakeTarget, new_chap: NewChap, mutual: bool) -> None:
    chap = new_chap(mutual)
    target = make_target(8 << 20, chap=chap)
    async with logged_in(target, credentials=chap_credentials(chap)) as session:
        assert session.parameters is not None
        assert session.parameters.auth_method == "CHAP"
        assert await _capacity_blocks(session, target) == target.size // 512


@pytest.mark.parametrize("mutual", [False, True], ids=["one-way", "mutual"])
def test_chap_hbactl_secrets_in_url(make_target: MakeTarget, new_chap: NewChap,
                                    mutual: bool) -> None:
    chap = new_chap(mutual)
    target = make_target(8 << 20, chap=chap)
    proc = hbactl("readcap", target.url(), "--json")
    assert json.loads(assert_ok(proc))["blocks"] == target.size // 512
    assert_no_secrets(proc, _secrets(chap))
    # -v logs the protocol (keys offered, the URL ...): still no secret.
    proc = hbactl("-vv", "inquiry", target.url())
    assert "Vendor:" in assert_ok(proc)
    assert_no_secrets(proc, _secrets(chap))


def test_chap_hbactl_secrets_from_environment(make_target: MakeTarget,
                                              new_chap: NewChap) -> None:
    chap = new_chap(mutual=True)
    target = make_target(8 << 20, chap=chap)
    url = (f"iscsi://{chap.userid}@{target.portal}/{target.iqn}/{target.lun}"
           f"?target_user={chap.mutual_userid}")
    assert chap.mutual_password is not None
    for names in (("ISCSI_HBA_CHAP_SECRET", "ISCSI_HBA_TARGET_CHAP_SECRET"),
                  ("LIBISCSI_CHAP_PASSWORD", "LIBISCSI_CHAP_TARGET_PASSWORD")):
        env = {names[0]: chap.password, names[1]: chap.mutual_password}
        proc = hbactl("readcap", url, env=env)
        assert "Blocks:" in assert_ok(proc)
        assert_no_secrets(proc, _secrets(chap))


@pytest.mark.parametrize("algorithms", [
    (ChapAlgorithm.MD5,),
    (ChapAlgorithm.SHA1, ChapAlgorithm.MD5),  # tgt skips 6, which it does not know
    (ChapAlgorithm.SHA3_256, ChapAlgorithm.MD5),  # and 8
], ids=["MD5", "SHA1,MD5", "SHA3-256,MD5"])
@pytest.mark.parametrize("mutual", [False, True], ids=["one-way", "mutual"])
async def test_chap_algorithms_tgt_supports(make_target: MakeTarget, new_chap: NewChap,
                                            mutual: bool,
                                            algorithms: tuple[ChapAlgorithm, ...]) -> None:
    chap = new_chap(mutual)
    target = make_target(8 << 20, chap=chap)
    credentials = chap_credentials(chap, algorithms=algorithms)
    async with logged_in(target, credentials=credentials) as session:
        assert await _capacity_blocks(session, target) == target.size // 512


@pytest.mark.parametrize("algorithms", [
    (ChapAlgorithm.SHA256, ChapAlgorithm.MD5),  # tgt picks 7 and computes SHA-1
    (ChapAlgorithm.SHA1,),                      # nothing tgt knows
], ids=["SHA256-first", "SHA1-only"])
async def test_chap_algorithms_tgt_gets_wrong(make_target: MakeTarget, new_chap: NewChap,
                                              algorithms: tuple[ChapAlgorithm, ...]) -> None:
    chap = new_chap()
    target = make_target(8 << 20, chap=chap)
    session = Session(portal_of(target), target.iqn,
                      session_config(credentials=chap_credentials(chap, algorithms=algorithms)))
    with pytest.raises(LoginError) as info:
        await session.login()
    message = str(info.value)
    assert target.iqn in message and "\n" not in message
    assert chap.password not in message


async def test_wrong_secret(make_target: MakeTarget, new_chap: NewChap) -> None:
    chap = new_chap()
    target = make_target(8 << 20, chap=chap)
    wrong = "wrong-secret-4567"
    session = Session(portal_of(target), target.iqn,
                      session_config(credentials=chap_credentials(chap, secret=wrong)))
    with pytest.raises(LoginAuthenticationError, match="CHAP") as info:
        await session.login()
    assert isinstance(info.value, AuthenticationError)
    assert info.value.status_class == 2 and info.value.status_detail == 1
    assert wrong not in str(info.value) and chap.password not in str(info.value)

    url = f"iscsi://{chap.userid}%{wrong}@{target.portal}/{target.iqn}/{target.lun}"
    for command in ("readcap", "inquiry"):
        assert_one_line_error(hbactl(command, url), 1, mentions=["CHAP", target.iqn],
                              secrets=[wrong, chap.password])
    assert_one_line_error(hbactl("readcap", url, "--json"), 1, mentions=["CHAP"],
                          secrets=[wrong, chap.password])


async def test_wrong_mutual_secret_is_refused_by_us(make_target: MakeTarget,
                                                    new_chap: NewChap) -> None:
    # tgtd accepts our response and proves itself with its real secret; we expect another
    # one, so its answer does not check out and we end the login.
    chap = new_chap(mutual=True)
    target = make_target(8 << 20, chap=chap)
    wrong = "not-the-target-secret"
    credentials = chap_credentials(chap, target_secret=wrong)
    session = Session(portal_of(target), target.iqn, session_config(credentials=credentials))
    with pytest.raises(AuthenticationError, match="CHAP") as info:
        await session.login()
    message = str(info.value)
    assert chap.mutual_userid is not None and chap.mutual_password is not None
    assert "target" in message and wrong not in message and chap.mutual_password not in message

    url = (f"iscsi://{chap.userid}%{chap.password}@{target.portal}/{target.iqn}/{target.lun}"
           f"?target_user={chap.mutual_userid}&target_password={wrong}")
    assert_one_line_error(hbactl("readcap", url), 1, mentions=["CHAP"],
                          secrets=[wrong, *_secrets(chap)])


async def test_chap_required_but_not_offered(make_target: MakeTarget, new_chap: NewChap) -> None:
    chap = new_chap()
    target = make_target(8 << 20, chap=chap)
    session = Session(portal_of(target), target.iqn, session_config())
    with pytest.raises(ISCSIError):
        await session.login()
    assert_one_line_error(hbactl("readcap", target.url(credentials=False)), 1,
                          mentions=[target.iqn, "requires CHAP", "<user>%<secret>@"],
                          secrets=[chap.password])


async def test_mutual_chap_asked_of_a_one_way_target(make_target: MakeTarget,
                                                     new_chap: NewChap) -> None:
    # tgtd has no outgoing account for this target, so it refuses our (right) response as
    # if it were wrong: the message must name that cause as well as the secret.
    chap = new_chap()
    target = make_target(8 << 20, chap=chap)
    url = (f"iscsi://{chap.userid}%{chap.password}@{target.portal}/{target.iqn}/{target.lun}"
           "?target_user=tgt-user&target_password=a-target-secret-1")
    assert_one_line_error(hbactl("readcap", url), 1,
                          mentions=["rejected our CHAP response", "no mutual CHAP credentials"],
                          secrets=[chap.password, "a-target-secret-1"])


async def test_chap_offered_to_a_target_without_it(target: TgtdTarget, new_chap: NewChap) -> None:
    # With credentials configured only CHAP is offered: a target that wants none cannot make
    # us log in unauthenticated.
    chap = new_chap()
    session = Session(portal_of(target), target.iqn,
                      session_config(credentials=chap_credentials(chap)))
    with pytest.raises(ISCSIError, match="CHAP"):
        await session.login()
    url = f"iscsi://{chap.userid}%{chap.password}@{target.portal}/{target.iqn}/{target.lun}"
    assert_one_line_error(hbactl("readcap", url), 1, mentions=["CHAP"], secrets=[chap.password])
