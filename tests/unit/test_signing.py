from bridgeway.jobs.signing import sign, verify

SECRET = b"s3cret"


def test_a_signature_verifies_and_binds_body_secret_and_time():
    header = sign(SECRET, b'{"a":1}', 1_000_000)
    assert verify(SECRET, b'{"a":1}', header, 1_000_010)
    assert not verify(SECRET, b'{"a":2}', header, 1_000_010)  # another body
    assert not verify(b"other", b'{"a":1}', header, 1_000_010)  # another secret
    assert not verify(SECRET, b'{"a":1}', header, 1_000_000 + 301)  # too old: a replay
    forged = header.replace("t=1000000", "t=1000300")  # a fresh time on an old signature
    assert not verify(SECRET, b'{"a":1}', forged, 1_000_300)


def test_garbage_headers_are_refused_not_raised():
    for header in ("", "t=x,v1=y", "v1=abc", "t=1", "nonsense"):
        assert not verify(SECRET, b"", header, 1)
