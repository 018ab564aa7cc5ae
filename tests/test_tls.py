"""The serving certificate the picker generates for itself is a leaf for serving only; the
client TLS context (epp.tls.client_context) verifies unless told not to."""

import ipaddress
import ssl

import pytest
from cryptography import x509
from cryptography.x509.oid import ExtendedKeyUsageOID

from epp.requestcontrol.producers.tokens_render import RenderSettings
from epp.tls import client_context, self_signed


def test_generated_certificate_is_a_server_leaf_not_a_ca():
    pem, key = self_signed(hostname="epp-7d9f-abcde")
    cert = x509.load_pem_x509_certificate(pem)
    basic = cert.extensions.get_extension_for_class(x509.BasicConstraints)
    assert basic.critical and basic.value.ca is False
    usage = cert.extensions.get_extension_for_class(x509.KeyUsage).value
    assert usage.digital_signature and usage.key_encipherment
    assert not usage.key_cert_sign and not usage.crl_sign
    eku = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert list(eku) == [ExtendedKeyUsageOID.SERVER_AUTH]
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == ["localhost", "epp-7d9f-abcde"]
    assert ipaddress.ip_address("127.0.0.1") in san.get_values_for_type(x509.IPAddress)
    assert b"PRIVATE KEY" in key


def test_client_context_verifies_unless_told_and_names_the_bad_file(tmp_path):
    cert, key = self_signed()
    (tmp_path / "ca.pem").write_bytes(cert)
    (tmp_path / "tls.crt").write_bytes(cert)
    (tmp_path / "tls.key").write_bytes(key)
    assert client_context().verify_mode == ssl.CERT_REQUIRED and client_context().check_hostname
    assert client_context(insecure_skip_verify=True).verify_mode == ssl.CERT_NONE
    assert client_context(str(tmp_path / "ca.pem")).cert_store_stats()["x509"] == 1  # only the given bundle
    client_context(cert_path=str(tmp_path / "tls.crt"), key_path=str(tmp_path / "tls.key"))
    with pytest.raises(ValueError, match=r"^caCertPath: cannot load CA bundle"):
        client_context(str(tmp_path / "missing.pem"))
    with pytest.raises(ValueError, match=r"^clientCertPath: cannot load client certificate"):
        client_context(cert_path=str(tmp_path / "tls.key"), key_path=str(tmp_path / "tls.crt"))
    with pytest.raises(ValueError, match=r"^caCertPath: "):  # the vLLM render client uses it too
        RenderSettings(url="https://render:8000", ca_cert_path=str(tmp_path / "missing.pem")).ssl_context()
    assert RenderSettings(url="http://render:8000").ssl_context() is True
