"""Tampering with the database alone: write access to every table, but no PNS_SECRET_KEY.

The attacker writes SQL on their own connection (as with a stolen database password or a
restored, edited backup). What they can write must never pass a factor: a planted recovery
code and a TOTP secret moved to another client's (or another device's) row are refused."""

from __future__ import annotations

import base64
import hashlib
import os
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import httpx
import pyotp
import pytest
from alembic import command
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from fastapi import FastAPI
from sqlalchemy import select, text
from sqlalchemy.ext.asyncio import AsyncConnection, create_async_engine

from pns_server.config import async_database_url
from pns_server.migrate import alembic_config, upgrade_to_head
from pns_server.models import Device, Pairing, RecoveryCode
from pns_server.otp import recovery_codes
from pns_server.security import SecretBox
from tests.conftest import SECRET_KEY, in_thread
from tests.pns_server.approvals.helpers import runtime_of
from tests.support.factories import (
    RegisteredClient,
    pair_app_device,
    pair_totp_device,
    register_client,
)

GUESSED_KEY = "the-attacker-guesses-this-key-0123"


@asynccontextmanager
async def attacker_sql(database_url: str) -> AsyncIterator[AsyncConnection]:
    """A connection of the attacker's own, outside the relay; commits on exit."""
    engine = create_async_engine(async_database_url(database_url))
    try:
        async with engine.begin() as conn:
            yield conn
    finally:
        await engine.dispose()


async def sql(database_url: str, statement: str, **params: Any) -> list[Any]:
    async with attacker_sql(database_url) as conn:
        result = await conn.execute(text(statement), params)
        return list(result.all()) if result.returns_rows else []


def code_of(secret: str) -> str:
    return pyotp.TOTP(secret).now()


async def verify_otp(http: httpx.AsyncClient, client: RegisteredClient, code: str) -> Any:
    return await http.post("/v1/otp/verify", json={"code": code}, headers=client.headers)


async def use_recovery(http: httpx.AsyncClient, client: RegisteredClient, code: str) -> Any:
    return await http.post("/v1/recovery-codes/verify", json={"code": code}, headers=client.headers)


def refused(response: httpx.Response, code: str) -> bool:
    return response.status_code == 401 and response.json()["code"] == code


class TestPlantedRecoveryCode:
    async def test_a_code_hashed_as_release_1_did_is_refused(
        self, http: httpx.AsyncClient, database_url: str
    ) -> None:
        victim = await register_client(http, "VICTIM")
        await http.post("/v1/recovery-codes", headers=victim.headers)
        planted = "abcd-efgh-jk"
        await sql(
            database_url,
            "INSERT INTO recovery_codes (id, client_id, code_hash, created_at) "
            "VALUES (:id, :client, :hash, CURRENT_TIMESTAMP)",
            id=os.urandom(16).hex(),
            client=victim.client_id,
            hash=recovery_codes.hash_code(victim.client_id, planted),
        )
        assert refused(await use_recovery(http, victim, planted), "recovery_code_invalid")

    async def test_a_code_keyed_with_a_guessed_key_is_refused(
        self, http: httpx.AsyncClient, database_url: str
    ) -> None:
        victim = await register_client(http, "VICTIM")
        await http.post("/v1/recovery-codes", headers=victim.headers)
        stored = await sql(
            database_url,
            "SELECT code_hash FROM recovery_codes WHERE client_id = :c",
            c=victim.client_id,
        )
        real_key_id = stored[0][0].split(".")[1]  # visible in every stored hash
        planted = "mnpq-rstu-vw"
        inner = recovery_codes.hash_code(victim.client_id, planted)
        forged = SecretBox([GUESSED_KEY]).keyed_hash(
            recovery_codes.pepper_input(victim.client_id, inner)
        )
        forged_with_real_id = ".".join(["h2", real_key_id, forged.split(".")[2]])
        for value in (forged, forged_with_real_id):
            await sql(
                database_url,
                "UPDATE recovery_codes SET code_hash = :h WHERE id = "
                "(SELECT MIN(id) FROM recovery_codes WHERE client_id = :c AND code_hash <> :h)",
                h=value,
                c=victim.client_id,
            )
        assert refused(await use_recovery(http, victim, planted), "recovery_code_invalid")

    async def test_hashes_copied_from_the_attackers_client_are_refused(
        self, http: httpx.AsyncClient, database_url: str
    ) -> None:
        attacker = await register_client(http, "ATTACKER")
        victim = await register_client(http, "VICTIM")
        codes = (await http.post("/v1/recovery-codes", headers=attacker.headers)).json()["codes"]
        assert (await use_recovery(http, attacker, codes[0])).status_code == 200  # control
        await sql(
            database_url,
            "UPDATE recovery_codes SET client_id = :victim WHERE client_id = :attacker",
            victim=victim.client_id,
            attacker=attacker.client_id,
        )
        assert refused(await use_recovery(http, victim, codes[1]), "recovery_code_invalid")


class TestMovedTotpSecret:
    async def test_secret_moved_to_another_clients_device_is_refused(
        self, http: httpx.AsyncClient, database_url: str
    ) -> None:
        attacker = await register_client(http, "ATTACKER")
        victim = await register_client(http, "VICTIM")
        own = await pair_app_device(http, attacker, push=None)
        target = await pair_app_device(http, victim, push=None)
        await sql(
            database_url,
            "UPDATE devices SET totp_secret = (SELECT totp_secret FROM devices WHERE id = :src) "
            "WHERE id = :dst",
            src=own.device_id,
            dst=target.device_id,
        )
        assert refused(await verify_otp(http, victim, code_of(own.totp_secret)), "otp_invalid")
        # The victim's own phone no longer produces a match either: the row is unusable,
        # not silently re-keyed.
        assert refused(await verify_otp(http, victim, code_of(target.totp_secret)), "otp_invalid")

    async def test_secret_moved_to_another_device_of_the_same_client_is_refused(
        self, http: httpx.AsyncClient, database_url: str
    ) -> None:
        owner = await register_client(http, "OWNER")
        old_phone = await pair_app_device(http, owner, push=None)  # the attacker kept it
        await pair_app_device(http, owner, name="New phone", push=None)
        rows = await sql(
            database_url, "SELECT id FROM devices WHERE client_id = :c", c=owner.client_id
        )
        new_id = next(r[0] for r in rows if r[0] != old_phone.device_id)
        await sql(
            database_url,
            "UPDATE devices SET totp_secret = (SELECT totp_secret FROM devices WHERE id = :src) "
            "WHERE id = :dst",
            src=old_phone.device_id,
            dst=new_id,
        )
        # The owner removes the old phone; its secret, copied into the new phone's row,
        # must not outlive it.
        removed = await http.delete(f"/v1/devices/{old_phone.device_id}", headers=owner.headers)
        assert removed.status_code == 204
        assert refused(await verify_otp(http, owner, code_of(old_phone.totp_secret)), "otp_invalid")

    async def test_device_row_moved_to_another_client_is_refused(
        self, http: httpx.AsyncClient, database_url: str
    ) -> None:
        attacker = await register_client(http, "ATTACKER")
        victim = await register_client(http, "VICTIM")
        _device_id, secret = await pair_totp_device(http, attacker)
        await sql(
            database_url,
            "UPDATE devices SET client_id = :victim WHERE client_id = :attacker",
            victim=victim.client_id,
            attacker=attacker.client_id,
        )
        next_step = pyotp.TOTP(secret).at(time.time() + 30)  # the pairing used the current one
        assert refused(await verify_otp(http, victim, next_step), "otp_invalid")

    async def test_pairing_secret_moved_to_another_clients_pairing_is_refused(
        self, http: httpx.AsyncClient, database_url: str
    ) -> None:
        attacker = await register_client(http, "ATTACKER")
        victim = await register_client(http, "VICTIM")
        own = await http.post("/v1/pairings", json={"kind": "totp"}, headers=attacker.headers)
        theirs = await http.post("/v1/pairings", json={"kind": "totp"}, headers=victim.headers)
        secret = own.json()["otpauth_uri"].split("secret=")[1].split("&")[0]
        await sql(
            database_url,
            "UPDATE pairings SET totp_secret = (SELECT totp_secret FROM pairings WHERE id = :s) "
            "WHERE id = :d",
            s=own.json()["pairing_id"],
            d=theirs.json()["pairing_id"],
        )
        confirmed = await http.post(
            f"/v1/pairings/{theirs.json()['pairing_id']}/confirm",
            json={"code": code_of(secret)},
            headers=victim.headers,
        )
        assert refused(confirmed, "otp_invalid")
        devices = (await http.get("/v1/devices", headers=victim.headers)).json()["devices"]
        assert devices == []


def release_1_seal(secret_key: str, plaintext: str) -> str:
    """How release 1 sealed TOTP secrets (AES-GCM, bound only to the key id); kept here,
    apart from the server code, so the migration is tested against the real old format."""
    key_id = hashlib.sha256(b"pns-key-id|" + secret_key.encode()).hexdigest()[:8]
    hkdf = HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=b"pns-secretbox-v1")
    nonce = os.urandom(12)
    sealed = AESGCM(hkdf.derive(secret_key.encode())).encrypt(
        nonce, plaintext.encode(), key_id.encode()
    )
    return f"v1.{key_id}.{base64.urlsafe_b64encode(nonce + sealed).decode()}"


class TestUpgradeFromRelease1:
    async def test_old_rows_are_bound_and_peppered_and_keep_working(
        self, http: httpx.AsyncClient, app: FastAPI, database_url: str
    ) -> None:
        client = await register_client(http)
        phone = await pair_app_device(http, client, push=None)
        codes = (await http.post("/v1/recovery-codes", headers=client.headers)).json()["codes"]
        pending = await http.post("/v1/pairings", json={"kind": "totp"}, headers=client.headers)
        pairing_id = pending.json()["pairing_id"]
        pairing_secret = pending.json()["otpauth_uri"].split("secret=")[1].split("&")[0]

        url = async_database_url(database_url)
        keys = [SECRET_KEY]
        in_thread(command.downgrade, alembic_config(url, keys), "0001")
        # The rows exactly as release 1 wrote them.
        await sql(
            database_url,
            "UPDATE devices SET totp_secret = :s WHERE id = :i",
            s=release_1_seal(SECRET_KEY, phone.totp_secret),
            i=phone.device_id,
        )
        await sql(
            database_url,
            "UPDATE pairings SET totp_secret = :s WHERE id = :i",
            s=release_1_seal(SECRET_KEY, pairing_secret),
            i=pairing_id,
        )
        await sql(database_url, "DELETE FROM recovery_codes")
        for code in codes:
            await sql(
                database_url,
                "INSERT INTO recovery_codes (id, client_id, code_hash, created_at) "
                "VALUES (:id, :c, :h, CURRENT_TIMESTAMP)",
                id=os.urandom(16).hex(),
                c=client.client_id,
                h=recovery_codes.hash_code(client.client_id, code),
            )

        in_thread(upgrade_to_head, url, keys)

        box = runtime_of(app).box
        async with runtime_of(app).db.session() as session:
            device = await session.get(Device, phone.device_id)
            pairing = await session.get(Pairing, pairing_id)
            hashes = list(await session.scalars(select(RecoveryCode.code_hash)))
        assert device is not None and device.totp_secret.startswith("v2.")
        assert box.open(device.totp_secret, device.secret_site) == phone.totp_secret
        assert pairing is not None and pairing.totp_secret is not None
        assert box.open(pairing.totp_secret, pairing.secret_site) == pairing_secret
        assert len(hashes) == 10 and all(h.startswith("h2.") for h in hashes)

        assert (await verify_otp(http, client, code_of(phone.totp_secret))).status_code == 200
        assert (await use_recovery(http, client, codes[3])).status_code == 200
        confirmed = await http.post(
            f"/v1/pairings/{pairing_id}/confirm",
            json={"code": code_of(pairing_secret)},
            headers=client.headers,
        )
        assert confirmed.status_code == 200, confirmed.text

    async def test_a_secret_under_an_unknown_key_stops_the_upgrade(
        self, http: httpx.AsyncClient, database_url: str
    ) -> None:
        client = await register_client(http)
        phone = await pair_app_device(http, client, push=None)
        url = async_database_url(database_url)
        in_thread(command.downgrade, alembic_config(url, [SECRET_KEY]), "0001")
        await sql(
            database_url,
            "UPDATE devices SET totp_secret = :s WHERE id = :i",
            s=release_1_seal("a-key-nobody-configured-0123", phone.totp_secret),
            i=phone.device_id,
        )
        with pytest.raises(RuntimeError, match="PNS_OLD_SECRET_KEYS"):
            in_thread(upgrade_to_head, url, [SECRET_KEY])
        # With the missing key added the upgrade completes.
        in_thread(upgrade_to_head, url, [SECRET_KEY, "a-key-nobody-configured-0123"])
        assert (await verify_otp(http, client, code_of(phone.totp_secret))).status_code == 200
