"""The pool's behaviour against a sequential run: items of every shape, errors, calls."""

import threading

import numpy as np
import pytest

import shmexec
import workfns


@pytest.fixture(scope="module")
def pool():
    with shmexec.Pool(workfns.double, workers=2) as p:
        yield p


def chunks(n, size=1000, dtype=np.float32):
    return [np.arange(size, dtype=dtype) * (i + 1) for i in range(n)]


def test_map_is_ordered_and_matches_sequential(pool):
    data = chunks(50, 4096)
    got = [np.array(r) for r in pool.map(data)]
    assert len(got) == 50
    for g, x in zip(got, data):
        np.testing.assert_array_equal(g, x * 2)
        assert g.dtype == np.float32


def test_results_are_read_only_views_that_outlive_the_call(pool):
    results = list(pool.map(chunks(5)))
    assert not results[0].flags.writeable
    with pytest.raises(ValueError):
        results[0][0] = 1
    # The pool goes on while earlier results are held.
    assert len(list(pool.map(chunks(3)))) == 3
    np.testing.assert_array_equal(results[4], chunks(5)[4] * 2)


def test_imap_unordered_gives_every_result(pool):
    data = chunks(40, 100)
    got = sorted(float(r[1]) for r in pool.imap_unordered(data))
    assert got == sorted(float(x[1] * 2) for x in data)


def test_len_follows_the_input(pool):
    r = pool.map(chunks(7))
    assert len(r) == 7
    assert len(list(r)) == 7
    g = pool.map(x for x in chunks(2))
    with pytest.raises(TypeError):
        len(g)
    g.close()


def test_dtypes_and_shapes_survive(pool):
    items = [
        np.arange(12, dtype=np.int16).reshape(3, 4),
        np.array(5.0),
        np.zeros((0, 3), np.float64),
        np.arange(10, dtype=np.uint64)[::2],  # not contiguous
        np.asfortranarray(np.arange(6, dtype=np.int32).reshape(2, 3)),
        np.array([1 + 2j, 3j], dtype=np.complex128),
        np.array(["2026-01-01", "2026-12-02"], dtype="datetime64[ns]").astype(np.int64),
    ]
    for x, y in zip(items, pool.map(items)):
        np.testing.assert_array_equal(y, x * 2)
        assert y.shape == x.shape and y.dtype == x.dtype


def test_structured_records_with_metadata():
    dt = np.dtype([("time", "<i8"), ("channel", "<i2"), ("data", "<i2", (5,))])
    items = []
    for i in range(10):
        r = np.zeros(20 + i, dtype=dt)
        r["time"] = np.arange(len(r)) * 10 + i
        r["data"] = i
        items.append({"records": r, "meta": {"shift": i, "tag": f"c{i}"}})
    with shmexec.Pool(workfns.records_in_records_out, workers=2) as p:
        for item, (out, meta) in zip(items, p.map(items)):
            want, want_meta = workfns.records_in_records_out(item)
            assert out.dtype == want.dtype
            np.testing.assert_array_equal(out, want)
            assert meta == want_meta


def test_tuples_dicts_and_scalars():
    items = [(np.arange(4) + i, np.ones(4), f"l{i}") for i in range(5)]
    with shmexec.Pool(workfns.pair, workers=2) as p:
        for (a, b, label), r in zip(items, p.map(items)):
            np.testing.assert_array_equal(r["sum"], a + b)
            assert r["label"] == label.upper() and r["none"] is None
    with shmexec.Pool(workfns.scalar, workers=1) as p:
        assert list(p.map(chunks(3, 10))) == [float(x.sum()) for x in chunks(3, 10)]


def test_an_exception_is_raised_in_its_place_and_the_pool_goes_on():
    data = [np.full(4, i, np.int64) for i in range(6)]
    with shmexec.Pool(workfns.fail_on_three, workers=2) as p:
        it = p.map(data)
        got = [next(it) for _ in range(3)]
        with pytest.raises(shmexec.TaskError) as e:
            next(it)
        assert e.value.index == 3
        assert "ValueError: three at 3" in e.value.traceback
        assert "fail_on_three" in e.value.traceback
        assert e.value.remote_type == "ValueError"
        got += list(it)
        assert [int(g[0]) for g in got] == [1, 2, 3, 5, 6]
        # errors="yield": the exception object in the item's place.
        out = list(p.map(data, errors="yield"))
        assert isinstance(out[3], shmexec.TaskError) and out[3].index == 3
        assert int(out[5][0]) == 6


def test_a_view_kept_past_the_call_fails_that_item():
    with shmexec.Pool(workfns.keep_input, workers=1) as p:
        out = list(p.map(chunks(2), errors="yield"))
        assert all(isinstance(o, shmexec.TaskError) for o in out)
        assert "kept" in str(out[0])


def test_returning_a_view_of_the_input_is_copied_out():
    with shmexec.Pool(workfns.return_input_view, workers=1) as p:
        for x, r in zip(chunks(4), p.map(chunks(4))):
            np.testing.assert_array_equal(r, x[2:5])


def test_results_written_in_place():
    data = chunks(6, 1 << 16)
    with shmexec.Pool(workfns.write_into, workers=2, out="like_input") as p:
        for x, (out, n) in zip(data, p.map(data)):
            np.testing.assert_array_equal(out, x * 3)
            assert n == int((x * 3 > 10).sum())
            assert not out.flags.writeable
    with shmexec.Pool(workfns.write_half, workers=1, out=workfns.out_half) as p:
        for x, out in zip(data, p.map(data)):
            assert out.dtype == np.float64
            np.testing.assert_array_equal(out, x[: len(x) // 2])


def test_initializer_runs_in_each_worker():
    with shmexec.Pool(
        workfns.read_state, workers=2, initializer=workfns.set_state, initargs=(42,)
    ) as p:
        seen = {tuple(r) for r in p.map(chunks(20, 10))}
    assert {v for v, _ in seen} == {42}
    assert {w for _, w in seen} <= {0, 1}


def test_a_failing_initializer_is_an_init_error():
    with pytest.raises(shmexec.InitError, match="no database here"):
        shmexec.Pool(workfns.double, workers=1, initializer=workfns.init_fails, max_start_attempts=1)


def test_functions_a_worker_cannot_find_are_refused_at_pool():
    with pytest.raises(TypeError, match="lambda"):
        shmexec.Pool(lambda x: x)

    def nested(x):
        return x

    with pytest.raises(TypeError, match="cannot be found"):
        shmexec.Pool(nested)


def test_bad_settings_are_clear_errors():
    with pytest.raises(ValueError):
        shmexec.Pool(workfns.double, workers=0)
    with pytest.raises(ValueError):
        shmexec.Pool(workfns.double, errors="ignore")
    with pytest.raises(ValueError, match="pin"):
        shmexec.Pool(workfns.double, workers=1, pin="sometimes")


def test_one_call_at_a_time_and_a_closed_call_frees_the_pool(pool):
    first = pool.map(chunks(10))
    next(first)
    with pytest.raises(RuntimeError, match="another call"):
        pool.map(chunks(1))
    first.close()
    assert len(list(pool.map(chunks(3)))) == 3
    # An abandoned iterator frees the pool when it is dropped.
    it = pool.map(chunks(10))
    next(it)
    del it
    assert len(list(pool.map(chunks(3)))) == 3


def test_an_item_larger_than_a_ring_fails_alone():
    with shmexec.Pool(workfns.double, workers=1, ring_bytes=1 << 20) as p:
        data = [np.ones(10), np.ones(1 << 20), np.ones(10)]
        out = list(p.map(data, errors="yield"))
        assert isinstance(out[1], shmexec.ItemTooLarge) and out[1].index == 1
        np.testing.assert_array_equal(out[2], np.ones(10) * 2)


def test_holding_every_result_is_an_error_not_a_hang():
    with shmexec.Pool(workfns.double, workers=1, ring_bytes=1 << 20) as p:
        held = []
        with pytest.raises(shmexec.OutputsHeld):
            for r in p.map(np.ones(1 << 14) for _ in range(100)):
                held.append(r)
        assert 0 < len(held) < 100
        # Still held, they block the next call too: an error again, not a hang.
        with pytest.raises(shmexec.OutputsHeld):
            list(p.map([np.ones(4)]))
        del held, r
        # copy=True gives results of their own: collecting all of them works.
        assert len(list(p.map([np.ones(1 << 14)] * 100, copy=True))) == 100


def test_stream_from_a_producer_thread():
    with shmexec.Pool(workfns.double, workers=2) as p:
        with p.stream() as s:
            data = chunks(30, 500)

            def produce():
                for x in data:
                    s.submit(x)
                s.close_input()

            t = threading.Thread(target=produce)
            t.start()
            got = [np.array(r) for r in s]
            t.join()
        for g, x in zip(got, data):
            np.testing.assert_array_equal(g, x * 2)
        with p.stream(ordered=False) as s:
            assert s.submit(np.ones(3)) == 0
            assert s.submit(np.ones(3)) == 1
            s.close_input()
            assert len(list(s)) == 2


def test_receive_with_a_timeout():
    with shmexec.Pool(workfns.sleepy, workers=1) as p:
        with p.stream() as s:
            s.submit(np.array([0.5]))
            with pytest.raises(TimeoutError):
                s.receive(timeout=0.05)
            np.testing.assert_array_equal(s.receive(timeout=30), [0.5])
            s.close_input()
            with pytest.raises(StopIteration):
                s.receive()


def test_stats_count_items_per_worker():
    with shmexec.Pool(workfns.double, workers=2) as p:
        list(p.map(chunks(20, 1000)))
        st = p.stats()
    assert st["items"] == 20
    assert sum(w["items"] for w in st["workers"]) == 20
    assert all(w["busy_seconds"] >= 0 for w in st["workers"])
    assert len(st["workers"]) == 2


def test_finishing_a_stream_another_thread_waits_on_keeps_the_pool():
    with shmexec.Pool(workfns.sleepy, workers=1) as p:
        s = p.stream()
        s.submit(np.array([1.0]))
        errors = []

        def consume():
            try:
                s.receive()
            except RuntimeError as e:
                errors.append(e)

        t = threading.Thread(target=consume)
        t.start()
        import time

        time.sleep(0.2)
        s.close()
        t.join(timeout=10)
        assert not t.is_alive() and errors and "finished" in str(errors[0])
        # The pool came back: the next call runs (after the worker skips or ends the
        # abandoned item).
        np.testing.assert_array_equal(list(p.map([np.array([0.0])]))[0], [0.0])


def test_an_out_function_may_return_out_and_use_subarray_dtypes():
    data = chunks(3, 100)
    with shmexec.Pool(workfns.returns_out, workers=1, out="like_input") as p:
        for x, r in zip(data, p.map(data)):
            assert isinstance(r, np.ndarray)
            np.testing.assert_array_equal(r, x - 1)
    with shmexec.Pool(workfns.write_vectors, workers=1, out=workfns.out_vectors) as p:
        for x, r in zip(data, p.map(data)):
            assert r.shape == (100, 3) and r.dtype == np.float64
            np.testing.assert_array_equal(r, np.repeat(x[:, None], 3, axis=1))


def test_a_kept_view_of_out_never_corrupts_a_later_result():
    data = [np.arange(1000, dtype=np.float64) + i for i in range(12)]
    with shmexec.Pool(workfns.keep_out, workers=1, out="like_input", ring_bytes=1 << 20) as p:
        out = list(p.map(data, errors="yield"))
    assert len(out) == 12
    kept = [o for o in out if isinstance(o, shmexec.TaskError)]
    assert kept and all("kept" in str(k) for k in kept)
    for x, o in zip(data, out):
        if not isinstance(o, shmexec.ShmexecError):
            np.testing.assert_array_equal(o, x)


def test_a_result_that_does_not_read_back_fails_in_its_place():
    with shmexec.Pool(workfns.returns_worker_only, workers=1) as p:
        r = p.map([np.zeros(3), np.ones(3)])
        with pytest.raises(shmexec.InvalidItem, match="does not read back") as e:
            next(r)
        assert e.value.index == 0 and "shmexec_only_in_worker" in str(e.value)
        with pytest.raises(shmexec.InvalidItem):
            next(r)
        with pytest.raises(StopIteration):
            next(r)
        got = list(p.map([np.zeros(2)], errors="yield"))
        assert isinstance(got[0], shmexec.InvalidItem)


def test_inputs_in_the_shared_region_are_not_copied():
    n = 1 << 20  # 4 MiB chunks, larger than the 1 MiB rings: they cannot have been copied
    with shmexec.Pool(workfns.where_input, workers=2, ring_bytes=1 << 20,
                      shared_bytes=16 * n * 4) as p:
        region = p.shared(np.float32)
        assert region.flags.writeable and region.shape == (16 * n,)
        chunks = [region[i * n:(i + 1) * n] for i in range(16)]
        for i, c in enumerate(chunks):
            c[:] = i
        got = list(p.map(chunks))
        assert got == [(float(i * n), False, "SharedRegion") for i in range(16)]
        # Any view of it, streamed too; an array outside it is copied as usual.
        with p.stream() as s:
            s.submit(region[5:105])
            s.submit(np.ones(100, np.float32))
            s.close_input()
            assert list(s) == [(0.0, False, "SharedRegion"), (100.0, False, "LentFrame")]
        # A non-contiguous view is made contiguous: a copy, in the ring.
        assert p.map([region[::2][:1000]]).__next__()[2] == "LentFrame"
        with pytest.raises(shmexec.ItemTooLarge):
            list(p.map([np.ones(n, np.float32)]))


def test_an_item_mixes_region_arrays_with_copied_ones():
    with shmexec.Pool(workfns.where_parts, workers=1, shared_bytes=1 << 20) as p:
        region = p.shared(np.int32)
        item = {"a": region[:10], "b": np.arange(3), "c": region[100:200].reshape(10, 10)}
        assert next(p.map([item])) == {"a": "SharedRegion", "b": "LentFrame",
                                       "c": "SharedRegion"}


def test_a_worker_cannot_write_the_region_and_may_keep_views_of_it():
    with shmexec.Pool(workfns.write_input, workers=1, shared_bytes=1 << 20) as p:
        region = p.shared(np.float64)
        with pytest.raises(shmexec.TaskError, match="read-only"):
            next(p.map([region[:10]]))
    with shmexec.Pool(workfns.keep_input, workers=1, shared_bytes=1 << 20) as p:
        region = p.shared(np.float64)
        region[:20] = 2.0
        # The region stays mapped in the worker: a view kept of it reads nothing stale.
        assert list(p.map([region[:10], region[10:20]])) == [20.0, 20.0]
    # The caller's arrays over the region outlive the pool.
    assert region[:20].sum() == 40.0
    with pytest.raises(RuntimeError, match="closed"):
        p.shared()


def test_a_pool_without_a_region_says_so():
    with shmexec.Pool(workfns.double, workers=1) as p:
        with pytest.raises(ValueError, match="shared_bytes"):
            p.shared()
    for bad in (-1, True, 1 << 64, 1.5):
        with pytest.raises(ValueError, match="shared_bytes"):
            shmexec.Pool(workfns.double, workers=1, shared_bytes=bad)
    with shmexec.Pool(workfns.double, workers=1, shared_bytes=4096) as p:
        with pytest.raises(ValueError, match="plain dtype"):
            p.shared(object)
        assert p.shared(np.float64).shape == (512,)


def test_an_error_raised_from_a_call_does_not_hold_the_pool():
    import gc

    gc.disable()
    try:
        with shmexec.Pool(workfns.fail_on_three, workers=1) as p:
            data = [np.full(2, i, np.int64) for i in range(5)]
            for _ in range(2):
                with pytest.raises(shmexec.TaskError):
                    list(p.map(data))
                # No cycle holds the failed call: the next one starts at once.
                assert len(list(p.map(data[:2]))) == 2
                # Nor one through the cause of an input that cannot be sent.
                with pytest.raises(shmexec.InvalidItem):
                    list(p.map([(data[0], lambda: 1)]))
                assert len(list(p.map(data[:2]))) == 2
            # An error kept (as `pytest.raises` keeps it) does not hold the call either.
            with pytest.raises(shmexec.TaskError) as kept:
                list(p.map(data))
            with pytest.raises(shmexec.InvalidItem) as kept_too:
                list(p.map([(data[0], lambda: 1)]))
            assert len(list(p.map(data[:2]))) == 2
            assert kept.value.index == 3 and kept_too.value.index == 0
        with shmexec.Pool(workfns.returns_worker_only, workers=1) as p:
            with pytest.raises(shmexec.InvalidItem):
                list(p.map([np.ones(2)]))
            assert len(list(p.map([np.ones(2)], errors="yield"))) == 1
    finally:
        gc.enable()


def test_an_array_paired_with_a_scalar_keeps_both():
    scalars = [7, 2.5, True, None, "label", b"raw", 1 + 2j, np.float32(0.25), np.int64(-3)]
    items = [(np.arange(6, dtype=np.int16).reshape(2, 3), s) for s in scalars]
    # A pair whose second half is not a scalar takes the general path; byte order survives.
    items += [(np.arange(3), [1, 2]), (np.arange(4, dtype=">i4"), 5)]
    with shmexec.Pool(workfns.with_scalar, workers=1) as p:
        for (x, s), (y, t) in zip(items, p.map(items)):
            np.testing.assert_array_equal(y, x * 2)
            assert y.dtype == (x * 2).dtype and y.shape == x.shape
            assert type(t) is type(s) and t == s
