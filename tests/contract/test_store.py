"""The Store contract (outbox.relay.Store), for PgStore and InMemoryStore alike."""

from __future__ import annotations

import asyncio

import orjson

from outbox.ports import StoreSession
from outbox.rows import Settlement
from tests.contract.conftest import StoreCase
from tests.support import until


async def test_claim_takes_ready_rows_in_id_order_up_to_the_limit(store_case: StoreCase) -> None:
    ids = [store_case.insert("rk") for _ in range(5)]
    session = await store_case.store.session()
    try:
        rows = await session.claim(3)
        assert [r.id for r in rows] == ids[:3]
        assert orjson.loads(rows[0].body) == {"x": 1}
        assert rows[0].content_type == "application/json"
        assert rows[0].headers is None and rows[0].attempts == 0
        await session.release()
    finally:
        await session.close()


async def test_a_claimed_row_is_skipped_by_other_sessions_until_released(
        store_case: StoreCase) -> None:
    ids = [store_case.insert("rk") for _ in range(2)]
    store_case.next_block()
    ids += [store_case.insert("rk") for _ in range(2)]
    a, b = await store_case.store.session(), await store_case.store.session()
    try:
        assert [r.id for r in await a.claim(1)] == ids[:1]
        assert [r.id for r in await b.claim(10)] == ids[2:]  # past the block a holds
        await b.release()
        await a.release()
        assert [r.id for r in await b.claim(10)] == ids  # released rows are back, untouched
        await b.release()
    finally:
        await a.close()
        await b.close()


async def test_rows_without_a_key_are_claimed_by_blocks(store_case: StoreCase) -> None:
    """The rows of a block (outbox.testing.BLOCK ids) that another session took rows from wait
    for it: a claim does not look at them, however many; the next block's are claimable."""
    first = [store_case.insert("rk") for _ in range(3)]
    a, b = await store_case.store.session(), await store_case.store.session()
    try:
        assert [r.id for r in await a.claim(1)] == first[:1]
        assert await b.claim(10) == []  # first[1:] are in the block a holds
        await b.release()
        store_case.next_block()
        later = store_case.insert("rk")
        assert [r.id for r in await b.claim(10)] == [later]
        await b.release()
        await a.settle(Settlement(sent=first[:1]))
        assert [r.id for r in await b.claim(10)] == [*first[1:], later]
        await b.release()
    finally:
        await a.close()
        await b.close()


async def test_a_claim_fills_its_batch_from_as_many_blocks_as_it_takes(
        store_case: StoreCase) -> None:
    """One row without a key per block, as when keyed rows are most of the outbox: a claim
    still fills its batch (past the 64 blocks the SQL claim locks, row by row), in id order."""
    ids = []
    for _ in range(70):
        ids.append(store_case.insert("rk"))
        store_case.next_block()
    session = await store_case.store.session()
    try:
        assert [r.id for r in await session.claim(70)] == ids
        await session.release()
    finally:
        await session.close()


async def test_settle_gives_each_retried_row_its_own_delay(store_case: StoreCase) -> None:
    """The settlement's writes reach the rows they name: of two retries in one batch, only the
    one with no delay is claimable again, counted once; the one parked stays out."""
    later, now, parked = (store_case.insert("rk") for _ in range(3))
    session = await store_case.store.session()
    try:
        await session.claim(10)
        s = Settlement()
        s.retry(later, 30.0, "nacked")
        s.retry(now, 0.0, "returned")
        s.park(parked, "too big", counted=True)
        await session.settle(s)
        [again] = await session.claim(10)
        assert (again.id, again.attempts) == (now, 1)
        await session.release()
        stats = await store_case.store.stats()
        assert (stats.pending, stats.retrying, stats.dead) == (2, 2, 1)
    finally:
        await session.close()


async def test_settle_removes_sent_reschedules_failed_and_parks_dead(
        store_case: StoreCase) -> None:
    sent, retry, dead = (store_case.insert("rk") for _ in range(3))
    session = await store_case.store.session()
    try:
        await session.claim(10)
        s = Settlement(sent=[sent])
        s.retry(retry, 0.4, "nacked")
        s.park(dead, "too big", counted=False)
        await session.settle(s)
        assert await session.claim(10) == []  # the retry is not ready yet
        await session.release()
        stats = await store_case.store.stats()
        assert (stats.pending, stats.retrying, stats.dead) == (1, 1, 1)
        await asyncio.sleep(0.5)  # the retry's delay (a deadline, not a synchronisation)
        [again] = await session.claim(10)
        assert again.id == retry and again.attempts == 1
        await session.release()
    finally:
        await session.close()


async def claim_exactly(session: StoreSession, want: list[int]) -> None:
    """Claim until the batch is ``want``: a keyed row waits while any older transaction in the
    cluster is still open (the ordering horizon), which other sessions may hold for a moment."""
    async def claimed() -> bool:
        if [r.id for r in await session.claim(10)] == want:
            return True
        await session.release()
        return False

    await until(claimed, 10, f"a claim of exactly {want}")


async def test_only_the_head_of_an_ordering_key_is_claimable(store_case: StoreCase) -> None:
    k1 = [store_case.insert("rk", ordering_key="k1") for _ in range(3)]
    free = store_case.insert("rk")
    k2 = store_case.insert("rk", ordering_key="k2")
    a, b = await store_case.store.session(), await store_case.store.session()
    try:
        await claim_exactly(a, [k1[0], free, k2])
        assert await b.claim(10) == []  # k1's second row waits for its head, even in flight
        await b.release()
        await a.settle(Settlement(sent=[k1[0], free, k2]))
        await claim_exactly(b, [k1[1]])
        s = Settlement()
        s.park(k1[1], "poison", counted=False)
        await b.settle(s)
        assert await a.claim(10) == []  # a dead row blocks its key
        await a.release()
        stats = await store_case.store.stats()
        assert (stats.dead, stats.blocked_keys, stats.pending) == (1, 1, 1)
    finally:
        await a.close()
        await b.close()


async def test_rows_released_by_one_session_are_claimed_by_another(
        store_case: StoreCase) -> None:
    """Rows released by one session (a crash, a lost connection) are claimed again."""
    ids: list[int] = []
    for _ in range(3):  # a block of two rows each
        ids += [store_case.insert("rk") for _ in range(2)]
        store_case.next_block()
    a, b = await store_case.store.session(), await store_case.store.session()
    try:
        assert [r.id for r in await a.claim(2)] == ids[:2]
        assert [r.id for r in await b.claim(2)] == ids[2:4]
        await a.release()  # ids[0:2] are pending again, below where b's scan went on
        await b.settle(Settlement(sent=ids[2:4]))
        got: list[int] = []
        async with asyncio.timeout(10):
            while len(got) < 4:
                batch = [r.id for r in await b.claim(2)]
                await b.settle(Settlement(sent=batch))
                got += batch
        assert sorted(got) == sorted(ids[:2] + ids[4:])
    finally:
        await a.close()
        await b.close()


async def test_want_wakeups_says_whether_it_changed_the_flag(store_case: StoreCase) -> None:
    session = await store_case.store.session()
    try:
        assert await session.want_wakeups(True) is False  # a fresh schema's flag is raised
        assert await session.want_wakeups(False) is True
        assert await session.want_wakeups(False) is False
        assert await session.want_wakeups(True) is True
        store_case.insert("rk")
        assert len(await session.claim(5)) == 1  # it never ends up inside a claim
        await session.release()
    finally:
        await session.close()


async def test_settle_says_the_newest_id_after_its_commit(store_case: StoreCase) -> None:
    """What `newest_id` would say right after the commit: a row committed during the batch
    counts (the relay then claims again at once), the rows the batch deleted do not."""
    first = store_case.insert("rk")
    session = await store_case.store.session()
    try:
        await session.claim(10)
        during = store_case.insert("rk")
        assert await session.settle(Settlement(sent=[first])) == during
        await session.claim(10)
        assert await session.settle(Settlement(sent=[during])) == 0  # an empty outbox
    finally:
        await session.close()


async def test_newest_id_is_the_highest_id_the_session_can_see(store_case: StoreCase) -> None:
    session = await store_case.store.session()
    try:
        assert await session.newest_id() == 0  # an empty outbox
        ids = [store_case.insert("rk") for _ in range(3)]
        assert await session.newest_id() == ids[-1]
        await session.claim(10)  # claimed rows are still rows: the probe sees them
        await session.release()
        assert await session.newest_id() == ids[-1]
    finally:
        await session.close()
