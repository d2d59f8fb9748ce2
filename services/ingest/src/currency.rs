//! ISO 4217 active currency codes.

const CODES: &str = "AED AFN ALL AMD ANG AOA ARS AUD AWG AZN BAM BBD BDT BGN BHD BIF BMD BND BOB BOV BRL BSD BTN \
BWP BYN BZD CAD CDF CHE CHF CHW CLF CLP CNY COP COU CRC CUC CUP CVE CZK DJF DKK DOP DZD EGP ERN ETB EUR FJD FKP GBP \
GEL GHS GIP GMD GNF GTQ GYD HKD HNL HTG HUF IDR ILS INR IQD IRR ISK JMD JOD JPY KES KGS KHR KMF KPW KRW KWD KYD KZT \
LAK LBP LKR LRD LSL LYD MAD MDL MGA MKD MMK MNT MOP MRU MUR MVR MWK MXN MXV MYR MZN NAD NGN NIO NOK NPR NZD OMR PAB \
PEN PGK PHP PKR PLN PYG QAR RON RSD RUB RWF SAR SBD SCR SDG SEK SGD SHP SLE SLL SOS SRD SSP STN SVC SYP SZL THB TJS \
TMT TND TOP TRY TTD TWD TZS UAH UGX USD USN UYI UYU UYW UZS VED VES VND VUV WST XAF XAG XAU XBA XBB XBC XBD XCD XCG \
XDR XOF XPD XPF XPT XSU XTS XUA YER ZAR ZMW ZWG ZWL";

/// The upper-case code if `code` is an ISO 4217 currency code (any case).
pub fn normalize(code: &str) -> Option<String> {
    let c = code.trim().to_ascii_uppercase();
    (c.len() == 3 && CODES.split_ascii_whitespace().any(|k| k == c)).then_some(c)
}

#[cfg(test)]
mod tests {
    #[test]
    fn known_codes_pass_and_others_fail() {
        assert_eq!(super::normalize(" eur"), Some("EUR".to_owned()));
        assert_eq!(super::normalize("USD"), Some("USD".to_owned()));
        assert_eq!(super::normalize("EURO"), None);
        assert_eq!(super::normalize("ABC"), None);
    }
}
