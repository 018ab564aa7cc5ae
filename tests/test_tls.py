"""The serving certificate the picker generates for itself is a leaf for serving only."""

import ipaddress

from cryptography import x509
from cryptography.x509.oid import ExtendedKeyUsageOID

from epp.tls import self_signed


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
