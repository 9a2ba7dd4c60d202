"""ND3xx: problems visible in a sample of the data (`DataContext.data`, a
`netdoctor.data.sample.DataSample`): `netdoctor check --data`, `netdoctor probe`."""
