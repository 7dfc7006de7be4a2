//! Command-line arguments shared by the producer and consumer examples.

/// Command-line arguments shared by the producer and consumer examples.
#[derive(Debug)]
pub struct Args {
    pub addr: String,
    pub login: Option<String>,
    pub passcode: Option<String>,
    pub destination: String,
    pub count: usize,
}

pub fn parse_args(program: &str) -> Result<Args, String> {
    let mut args = Args {
        addr: "127.0.0.1:1856".into(),
        login: None,
        passcode: None,
        destination: "/queue/demo".into(),
        count: 10,
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let mut value = || it.next().ok_or_else(|| format!("{flag} needs a value"));
        match flag.as_str() {
            "--addr" => args.addr = value()?,
            "--login" => args.login = Some(value()?),
            "--passcode" => args.passcode = Some(value()?),
            "--destination" => args.destination = value()?,
            "--count" => {
                let v = value()?;
                args.count = v
                    .parse()
                    .map_err(|_| format!("--count {v}: not a number"))?;
            }
            "-h" | "--help" => {
                return Err(format!(
                    "usage: {program} [--addr HOST:PORT] [--login USER] [--passcode PASS] \
                     [--destination /queue/NAME] [--count N]"
                ))
            }
            other => return Err(format!("unknown argument {other}")),
        }
    }
    Ok(args)
}
